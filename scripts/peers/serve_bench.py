"""jpaged's server and vLLM's CPU build, under vLLM's own serving benchmark client.

    python scripts/peers/serve_bench.py --server vllm,jpaged --rates 1,2,4,8,inf --repeat 3 --json
    python scripts/peers/serve_bench.py --server jpaged --dataset sharegpt_short_64 --rates 1,2,inf

Starts each server named (vLLM's `vllm.entrypoints.openai.api_server` in its venv, with the
environment `vllm_cpu.py` gives it; or `jpaged serve` in this Python, which warms up by
default), one after the other on ports `--port`, `--port`+1, ..., timing each until it is
ready (`ready_s`: vLLM's `/health`, which answers once its engine is up; jpaged's `/ready`,
which answers once warm-up is done). Then runs `vllm.benchmarks.serve` (the code of `vllm
bench serve`; the `vllm` command itself does not start in the `vllm-cpu` distribution) from
vLLM's venv against them, `--repeat` times per request rate (Poisson arrivals, ignore_eos,
each run its own prompts so no run is served from another's prefix cache), and prints the
median of each figure per server and rate: output tokens/s, TTFT, TPOT and inter-token
latency (mean, median, p99).

With several servers the runs interleave: each run's prompts and arrivals go to every
server in turn, the others idle meanwhile, so a shared machine's drift in speed over a
sitting falls on all of them alike (sweeps run one server after the other differed by up
to 1.6x in the same step's time between their halves of an hour).

Datasets: `random` (vLLM's: INPUT random prompt tokens, OUTPUT output tokens, NUM
requests) or a jpaged workload name (`sharegpt_short_64`): its prompts, decoded to text
with the model's tokenizer, and its per-request output lengths, through vLLM's `custom`
dataset (no chat template).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from vllm_cpu import PEERS, vllm_env, workload_file  # noqa: E402

CLIENT = ("import sys\nfrom vllm.utils.argparse_utils import FlexibleArgumentParser\n"
          "from vllm.benchmarks.serve import add_cli_args, main\n"
          "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n")
SERVED = "smollm2"  # the model name both servers answer to
KEYS = ("completed", "duration", "output_throughput", "request_throughput", "mean_ttft_ms",
        "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "p99_itl_ms")


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + path, timeout=5) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"no answer from {url}{path} in {timeout:.0f} s")


def custom_dataset(name: str, tokenizer_dir: str, run: int, out: pathlib.Path) -> pathlib.Path:
    """A jpaged workload as vLLM's custom dataset (JSONL of prompt text and output_tokens);
    `run` marks every prompt's start so no run meets another's cached prefix."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    workload = json.loads(workload_file(name).read_text())
    path = out / f"{name}-{run}.jsonl"
    with path.open("w") as f:
        for r in workload:
            text = f"Run {run}. " + tok.decode(r["prompt_token_ids"], skip_special_tokens=True)
            f.write(json.dumps({"prompt": text, "output_tokens": r["max_tokens"]}) + "\n")
    return path


def start_server(name: str, args, port: int, env: dict, log) -> tuple[subprocess.Popen, str]:
    """Start one server; returns (its process, its ready path)."""
    venv = pathlib.Path(args.venv)
    if name == "vllm":
        cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--model", args.model, "--served-model-name", SERVED, "--dtype", args.dtype,
               "--port", str(port), "--max-model-len", "2048", *shlex.split(args.vllm_args)]
        server_env, ready_path = env, "/health"
    else:
        cmd = [sys.executable, "-m", "jpaged", "serve", "--port", str(port),
               "--served-model-name", SERVED, "--dtype", args.dtype, "--log-level", "warning",
               *shlex.split(args.server_args)]
        server_env, ready_path = dict(os.environ), "/ready"
    return subprocess.Popen(cmd, env=server_env, stdout=log, stderr=subprocess.STDOUT), ready_path


def run_client(args, url: str, env: dict, run: int, rate: str, out: pathlib.Path) -> dict:
    """One run of vLLM's client against `url`; its result.json."""
    venv = pathlib.Path(args.venv)
    if args.dataset == "random":
        data = ["--dataset-name", "random", "--random-input-len", str(args.input_len),
                "--random-output-len", str(args.output_len)]
    else:
        path = custom_dataset(args.dataset, args.model, run, out)
        data = ["--dataset-name", "custom", "--dataset-path", str(path),
                "--custom-output-len", "-1", "--skip-chat-template"]
    client = [str(venv / "bin" / "python"), "-c", CLIENT, "--backend", "openai",
              "--base-url", url, "--endpoint", "/v1/completions", "--model", SERVED,
              "--tokenizer", args.model, *data, "--num-prompts", str(args.num_prompts),
              "--request-rate", rate, "--ignore-eos", "--seed", str(run),
              "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
              "--save-result", "--result-dir", str(out), "--result-filename", "result.json"]
    subprocess.run(client, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True,
                   help="vllm, jpaged, or both comma-separated (their runs interleave)")
    p.add_argument("--venv", default=str(PEERS / "vllm-cpu"), help="vLLM's CPU venv (server and client)")
    p.add_argument("--model", default=str(PEERS / "smollm2-hf"),
                   help="vLLM's HF folder, also the client's tokenizer (vllm_cpu.py makes it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--port", type=int, default=8123, help="the first server's port; the next one's +1")
    p.add_argument("--dataset", default="random", help="random, or a jpaged workload name")
    p.add_argument("--rates", default="4", help="request rates, comma-separated (inf: all at once)")
    p.add_argument("--repeat", type=int, default=1, help="runs per rate; the median is reported")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--server-args", default="", help="more flags for jpaged's server, one string")
    p.add_argument("--vllm-args", default="", help="more flags for vLLM's server, one string")
    p.add_argument("--ready-timeout", type=float, default=900)
    p.add_argument("--json", action="store_true", help="one JSON object per server and rate")
    args = p.parse_args()
    names = args.server.split(",")
    if not names or any(n not in ("vllm", "jpaged") for n in names) or len(set(names)) < len(names):
        p.error(f"--server: vllm, jpaged or both, each once (got {args.server!r})")
    env = vllm_env(pathlib.Path(args.venv))
    servers = {}  # name -> (process, url, ready_s)
    try:
        for i, name in enumerate(names):  # one after the other: each starts on an idle machine
            log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{name}-", suffix=".log", delete=False)
            proc, ready_path = start_server(name, args, args.port + i, env, log)
            url = f"http://127.0.0.1:{args.port + i}"
            servers[name] = (proc, url, None)
            servers[name] = (proc, url, wait_ready(url, ready_path, proc, args.ready_timeout))
        run = 0
        with tempfile.TemporaryDirectory() as out:
            for rate in args.rates.split(","):
                results = {name: [] for name in names}
                for _ in range(args.repeat):
                    run += 1
                    for name in names:  # the same prompts and arrivals for each
                        results[name].append(run_client(args, servers[name][1], env, run, rate,
                                                        pathlib.Path(out)))
                for name in names:
                    report(name, args, servers[name][2], rate, results[name])
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def report(name: str, args, ready_s: float, rate: str, results: list[dict]) -> None:
    row = {"server": name, "dtype": args.dtype, "dataset": args.dataset,
           "server_args": args.server_args if name == "jpaged" else args.vllm_args,
           "ready_s": ready_s, "request_rate": rate, "runs": len(results),
           **{k: statistics.median(r.get(k) or 0.0 for r in results) for k in KEYS}}
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        print(f"{name} rate {rate}: ready {ready_s:.1f} s, "
              f"{row['output_throughput']:.1f} out tok/s, TTFT mean "
              f"{row['mean_ttft_ms']:.0f} / p99 {row['p99_ttft_ms']:.0f} ms, TPOT mean "
              f"{row['mean_tpot_ms']:.0f} / p99 {row['p99_tpot_ms']:.0f} ms, ITL p99 "
              f"{row['p99_itl_ms']:.0f} ms (median of {len(results)})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
