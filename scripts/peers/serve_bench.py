"""One server, jpaged's or vLLM's CPU build, under vLLM's own serving benchmark client.

    python scripts/peers/serve_bench.py --server vllm --request-rate 4 --json
    python scripts/peers/serve_bench.py --server jpaged --request-rate 4 --json [--warmup]

Starts the server (vLLM's `vllm.entrypoints.openai.api_server` in its venv, with the
environment `vllm_cpu.py` gives it; or `jpaged serve` in this Python), times it until
`/v1/models` answers (`ready_s`), then runs `vllm.benchmarks.serve` (the code of `vllm bench
serve`; the `vllm` command itself does not start in the `vllm-cpu` distribution) from vLLM's
venv against it: the random dataset, INPUT prompt + OUTPUT output tokens, NUM requests at
RATE requests/s with Poisson arrivals, ignore_eos. Prints the client's figures (output
tokens/s, TTFT, TPOT, inter-token latency: mean, median, p99) and stops the server.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from vllm_cpu import PEERS, vllm_env  # noqa: E402

CLIENT = ("import sys\nfrom vllm.utils.argparse_utils import FlexibleArgumentParser\n"
          "from vllm.benchmarks.serve import add_cli_args, main\n"
          "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n")
KEYS = ("completed", "duration", "output_throughput", "request_throughput", "mean_ttft_ms",
        "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "p99_itl_ms")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no answer from {url} in {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=["vllm", "jpaged"], required=True)
    p.add_argument("--venv", default=str(PEERS / "vllm-cpu"), help="vLLM's CPU venv (server and client)")
    p.add_argument("--model", default=str(PEERS / "smollm2-hf"),
                   help="vLLM's HF folder, also the client's tokenizer (vllm_cpu.py makes it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--request-rate", type=float, default=4.0)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--warmup", action="store_true", help="jpaged: `jpaged serve --warmup`")
    p.add_argument("--server-args", default="", help="more flags for the server, one string")
    p.add_argument("--ready-timeout", type=float, default=900)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    venv = pathlib.Path(args.venv)
    name = "smollm2"
    env = vllm_env(venv)
    if args.server == "vllm":
        cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--model", args.model, "--served-model-name", name, "--dtype", args.dtype,
               "--port", str(args.port), "--max-model-len", "2048", *shlex.split(args.server_args)]
        server_env = env
    else:
        cmd = [sys.executable, "-m", "jpaged", "serve", "--port", str(args.port),
               "--served-model-name", name, "--dtype", args.dtype, "--log-level", "warning",
               *(["--warmup"] if args.warmup else []), *shlex.split(args.server_args)]
        server_env = dict(os.environ)
    url = f"http://127.0.0.1:{args.port}"
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{args.server}-", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_s = wait_ready(url, server, args.ready_timeout)
        with tempfile.TemporaryDirectory() as out:
            client = [str(venv / "bin" / "python"), "-c", CLIENT, "--backend", "openai",
                      "--base-url", url, "--endpoint", "/v1/completions", "--model", name,
                      "--tokenizer", args.model, "--dataset-name", "random",
                      "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                      "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
                      "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl",
                      "--metric-percentiles", "50,99", "--save-result", "--result-dir", out,
                      "--result-filename", "result.json"]
            subprocess.run(client, env=env, check=True, stdout=subprocess.DEVNULL)
            result = json.loads(pathlib.Path(out, "result.json").read_text())
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    row = {"server": args.server, "dtype": args.dtype, "warmup": args.warmup,
           "server_args": args.server_args, "ready_s": ready_s,
           "request_rate": args.request_rate, **{k: result.get(k) for k in KEYS}}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.server}: ready {ready_s:.1f} s, {row['output_throughput']:.1f} out tok/s, "
              f"TTFT mean {row['mean_ttft_ms']:.0f} / p99 {row['p99_ttft_ms']:.0f} ms, "
              f"TPOT mean {row['mean_tpot_ms']:.0f} ms, ITL p99 {row['p99_itl_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
