"""llama.cpp as a single-stream peer: one request at a time, greedy, each generating exactly
its max_tokens, timed after a warm-up request; output tokens/s is 1 / time per output token.

    python scripts/peers/llama_cpp_peer.py --gguf FILE [--workload single_stream.json] [--json]

Needs `llama-cpp-python` (pip builds it from source for this CPU; a benchmark peer, never a
jpaged dependency), in jpaged's venv or its own. The same workload through jpaged:
`jpaged bench throughput --workload FILE --max-num-seqs 1`. Without --workload, one
request: the first 32 prompt tokens of sharegpt_short_64's first request, 256 output tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def single_stream_workload(prompt_tokens: int = 32, max_tokens: int = 256) -> list[dict]:
    first = json.loads((REPO / "jpaged/benchmarks/data/sharegpt_short_64.json").read_text())[0]
    return [{"prompt_token_ids": first["prompt_token_ids"][:prompt_tokens], "max_tokens": max_tokens}]


def run(gguf: str, workload: list[dict], threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False, seed=0)
    load_s = time.perf_counter() - t0

    def generate(ids, n):
        llm.reset()
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == n:  # ignore end-of-sequence: exactly n tokens
                break
        return out

    generate(workload[0]["prompt_token_ids"], 8)  # warm-up
    t0 = time.perf_counter()
    outs = [generate(r["prompt_token_ids"], r["max_tokens"]) for r in workload]
    wall = time.perf_counter() - t0
    n = sum(len(o) for o in outs)
    import llama_cpp
    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "gguf": gguf,
            "requests": len(workload), "output_tokens": n, "wall_s": wall,
            "output_tokens_per_s": n / wall, "ms_per_output_token": wall / n * 1e3,
            "threads": threads, "load_s": load_s, "token_ids": outs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--workload", default=None, help="a JSON workload [default: one request, see above]")
    p.add_argument("--write-workload", default=None, metavar="FILE",
                   help="write the default single-stream workload to FILE and exit")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    workload = (json.loads(pathlib.Path(args.workload).read_text()) if args.workload
                else single_stream_workload())
    if args.write_workload:
        pathlib.Path(args.write_workload).write_text(json.dumps(workload))
        return 0
    result = run(args.gguf, workload, args.threads)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['engine']}: {result['output_tokens_per_s']:.1f} output tok/s "
              f"({result['ms_per_output_token']:.1f} ms per token) on {args.gguf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
