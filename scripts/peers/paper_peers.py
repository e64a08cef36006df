"""jpaged, transformers `generate` and vLLM's CPU build on the same workload files, one
sitting: output tokens/s, start-up (load) and first-pass seconds per (peer, dtype, workload).

    python scripts/peers/paper_peers.py --out results/peers --workloads sharegpt_256 alpaca_256 \
        --dtypes float32 bfloat16 --peers jpaged hf vllm [--num-requests K]

Run with jpaged's Python. Every point runs alone, in its own process, one after the other
(workload, then dtype, then peer, so the peers compared stand side by side in time), and
writes `{peer}_{dtype}_{workload}.json` (its output beside it, `.log`) into --out. Points
whose JSON is there are not run again, except those recorded as skipped or failed; the
Markdown table at the end covers every JSON in --out. Exits 1 if a point failed.

- jpaged: `python -m jpaged bench throughput --json --quiet` (warm-up first; load_s, and
  first_pass_s from process start to the timed run's end; --jpaged-args adds flags).
- hf: `hf_throughput` (jpaged/benchmarks/hf_baseline.py) in a process that loads no jpaged
  engine: static batches of --hf-batch-size, the model jpaged loads by default (its GGUF);
  load_s is transformers' `from_pretrained`, first_pass_s from process start to the end of
  its one timed pass.
- vllm: `vllm_cpu.py` in vLLM's venv (--venv); recorded as skipped when there is none.
  first_pass_s runs from the venv Python's start to the end of its untimed first pass.
All run with --max-model-len (default 2048; transformers has no such limit).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vllm_cpu import PEERS, workload_file  # noqa: E402

PEER_ORDER = ("jpaged", "hf", "vllm")
HF_POINT = """\
import json, sys, time
import torch, transformers
from jpaged.benchmarks.hf_baseline import hf_throughput
from jpaged.benchmarks.workloads import load_workload, process_start
workload, num, dtype, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
requests = load_workload(workload, int(num) if num else None)
r = {key.removeprefix("hf_"): v for key, v in hf_throughput(None, requests, dtype, batch, True).items()}
r["first_pass_s"] = time.time() - process_start()
p, o = sum(len(x["prompt_token_ids"]) for x in requests), sum(x["max_tokens"] for x in requests)
r.update(engine=f"transformers {transformers.__version__} (torch {torch.__version__})", dtype=dtype,
         workload=workload, requests=len(requests), prompt_tokens=p, output_tokens=o,
         total_tokens_per_s=(p + o) / r["wall_s"])
print(json.dumps(r))
"""


def point_command(peer: str, dtype: str, workload: str, args) -> list[str]:
    k = [] if args.num_requests is None else ["--num-requests", str(args.num_requests)]
    if peer == "jpaged":
        return [sys.executable, "-m", "jpaged", "bench", "throughput", "--workload", workload, *k,
                "--dtype", dtype, "--max-model-len", str(args.max_model_len), "--json", "--quiet",
                *shlex.split(args.jpaged_args)]
    if peer == "hf":
        return [sys.executable, "-c", HF_POINT, workload, str(args.num_requests or ""), dtype,
                str(args.hf_batch_size)]
    return [sys.executable, str(HERE / "vllm_cpu.py"), "--venv", args.venv, "--workload", workload, *k,
            "--dtype", dtype, "--max-model-len", str(args.max_model_len), "--json"]


def last_json(stdout: str) -> dict:
    """The last top-level JSON object in a point's stdout (vLLM may log there too)."""
    lines = stdout.splitlines(keepends=True)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.JSONDecoder().raw_decode("".join(lines[i:]))[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object in its output")


def run_point(peer: str, dtype: str, workload: str, path: pathlib.Path, args) -> dict:
    head = {"peer": peer, "dtype": dtype, "workload": workload, "num_requests": args.num_requests}
    if peer == "vllm" and not (pathlib.Path(args.venv) / "bin" / "python").exists():
        return {**head, "status": "skipped",
                "reason": f"no vLLM venv at {args.venv} (make it: scripts/peers/setup_vllm_cpu.sh)"}
    cmd = point_command(peer, dtype, str(workload_file(workload).resolve()), args)
    start = time.time()
    with open(path.with_suffix(".log"), "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    tail = path.with_suffix(".log").read_text().splitlines()[-5:]  # stderr's
    with open(path.with_suffix(".log"), "a") as log:
        log.write("--- stdout ---\n" + proc.stdout)  # vLLM logs there
    head.update(command=shlex.join(cmd), point_s=time.time() - start)
    if proc.returncode == 0:
        try:
            return {**head, "status": "ok", **last_json(proc.stdout)}
        except ValueError as e:
            error = str(e)
    else:
        error = f"exit status {proc.returncode}"
    return {**head, "status": "failed", "reason": error, "stderr_tail": tail}


def table(out: pathlib.Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    rank = {p: i for i, p in enumerate(PEER_ORDER)}
    rows.sort(key=lambda r: (r["workload"], r["dtype"] != "float32", r["dtype"], rank.get(r["peer"], 9)))

    def num(r, key, fmt):
        return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"

    lines = ["| peer | dtype | workload | requests | output tokens/s | start-up (load) s | first pass s | point s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = ([num(r, "output_tokens_per_s", ".1f"), num(r, "load_s", ".1f"),
                  num(r, "first_pass_s", ".1f"), num(r, "point_s", ".0f")] if r["status"] == "ok"
                 else [f"{r['status']}: {r.get('reason', '')}", "", "", num(r, "point_s", ".0f")])
        lines.append(f"| {r['peer']} | {r['dtype']} | {r['workload']} | {r.get('requests', r.get('num_requests') or 'all')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=pathlib.Path, help="a folder for one JSON per point")
    p.add_argument("--workloads", nargs="+", default=["sharegpt_256", "alpaca_256"],
                   help="shipped names or JSON files")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--peers", nargs="+", default=list(PEER_ORDER), choices=PEER_ORDER)
    p.add_argument("--num-requests", type=int, default=None, metavar="K", help="the first K requests")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--venv", default=str(PEERS / "vllm-cpu"), help="vLLM's CPU venv")
    p.add_argument("--jpaged-args", default="", help="more flags for jpaged bench throughput, as one string after = (--jpaged-args='--kv-policy paged')")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for workload in args.workloads:
        name = pathlib.Path(workload).stem if workload.endswith(".json") else workload
        for dtype in args.dtypes:
            for peer in args.peers:
                path = args.out / f"{peer}_{dtype}_{name}.json"
                if path.exists() and json.loads(path.read_text()).get("status") == "ok":
                    print(f"{path.name}: there already", file=sys.stderr)
                    continue
                print(f"{path.name}: running", file=sys.stderr, flush=True)
                result = run_point(peer, dtype, workload, path, args)
                result["workload_file"], result["workload"] = result.get("workload"), name
                path.write_text(json.dumps(result, indent=1) + "\n")
                failed += result["status"] == "failed"
                print(f"{path.name}: {result['status']} in {result.get('point_s', 0):.0f} s "
                      f"{result.get('reason', '')}", file=sys.stderr, flush=True)
    print(table(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
