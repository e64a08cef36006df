"""Benchmark workloads: synthetic requests with the length statistics of the vLLM paper,
shipped with the package (`data/`) and remade by `python -m jpaged.benchmarks.workloads`.

A workload is a JSON list of `{"prompt_token_ids": [...], "max_tokens": N}`; every request
generates exactly N tokens (ignore EOS), so engines compare on the same work. The paper
(arXiv 2309.06180, section 6.1) samples ShareGPT and Alpaca conversations: ShareGPT
prompts average about 161 tokens and outputs about 338, Alpaca about 19 and 58. No data
set can be downloaded here, so lengths are drawn from log-normal distributions with those
means and the prompts are random token ids. The shipped files are
`make_workload(name, n, seed=0)` for `SHIPPED`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np

DATA = pathlib.Path(__file__).with_name("data")
SHAPES = {  # mean prompt, mean output, sigma, output cap
    "sharegpt": (161.0, 338.0, 0.9, None),
    "sharegpt-short": (161.0, 120.0, 0.7, 256),
    "alpaca": (19.3, 58.5, 0.6, None),
}
SHIPPED = {"sharegpt_short_64": ("sharegpt-short", 64), "sharegpt_256": ("sharegpt", 256),
           "alpaca_256": ("alpaca", 256)}


def random_workload(n: int, input_len: int, output_len: int, seed: int = 0,
                    vocab: int = 49152) -> list[dict[str, Any]]:
    """vLLM's `random` dataset at range ratio 0: `n` prompts of exactly `input_len` random
    token ids, each generating exactly `output_len` tokens."""
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(100, vocab - 100, input_len).tolist(),
             "max_tokens": output_len} for _ in range(n)]


def make_workload(name: str, n: int, seed: int, vocab: int = 49152,
                  max_len: int = 2048) -> list[dict[str, Any]]:
    """`n` requests shaped like `name` (a key of SHAPES): prompts of random token ids in
    [100, vocab - 100), prompt + output at most `max_len` tokens."""
    mean_in, mean_out, sigma, cap = SHAPES[name]
    rng = np.random.default_rng(seed)

    def lognormal(mean):
        return rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)
    ins = np.clip(lognormal(mean_in).round(), 4, max_len // 2).astype(int)
    outs = np.clip(lognormal(mean_out).round(), 4, cap or max_len).astype(int)
    outs = np.minimum(outs, max_len - ins)
    return [{"prompt_token_ids": rng.integers(100, vocab - 100, int(i)).tolist(),
             "max_tokens": int(o)} for i, o in zip(ins, outs)]


def workload_path(workload: str | os.PathLike) -> pathlib.Path:
    """A shipped workload's name (`sharegpt_short_64`) or a path to a JSON file."""
    if str(workload) in SHIPPED:
        return DATA / f"{workload}.json"
    path = pathlib.Path(workload)
    if not path.is_file():
        raise FileNotFoundError(f"workload {str(workload)!r} is neither a shipped workload "
                                f"({', '.join(SHIPPED)}) nor a file")
    return path


def load_workload(workload: str | os.PathLike, num_requests: int | None = None) -> list[dict[str, Any]]:
    """Read and check a workload (a shipped name or a path); `num_requests` keeps the first K."""
    path = workload_path(workload)
    with open(path) as f:
        try:
            requests = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"workload {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(requests, list) or not requests:
        raise ValueError(f"workload {str(path)!r} must be a non-empty JSON list of "
                         '{"prompt_token_ids": [...], "max_tokens": N} objects')
    for i, req in enumerate(requests):
        ids = req.get("prompt_token_ids") if isinstance(req, dict) else None
        n = req.get("max_tokens") if isinstance(req, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"workload {str(path)!r}, request {i}: 'prompt_token_ids' must be a "
                             "non-empty list of integers")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"workload {str(path)!r}, request {i}: 'max_tokens' must be an "
                             f"integer >= 1, got {n!r}")
    if num_requests is not None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        requests = requests[:num_requests]
    return requests


def vary(token_ids: list[int], k: int) -> list[int]:
    """The same prompt length with every token id moved by k: a warm-up (or a later run)
    makes the same steps, but no prompt can be served from a cache another run filled."""
    return [t - k if t >= k else t + k for t in token_ids]


def process_start() -> float:
    """When this process started, in `time.time()` seconds (Linux: /proc; elsewhere the
    import of this module): the origin of a benchmark's first pass."""
    try:
        stat = pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def log(msg: str, quiet: bool) -> None:
    """Benchmark progress, on stderr."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jpaged.benchmarks.workloads",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=SHAPES)
    p.add_argument("n", type=int)
    p.add_argument("seed", type=int)
    p.add_argument("out", metavar="OUT.json")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--max-len", type=int, default=2048)
    a = p.parse_args(argv)
    w = make_workload(a.name, a.n, a.seed, a.vocab, a.max_len)
    with open(a.out, "w") as f:
        json.dump(w, f)
    ins = [len(r["prompt_token_ids"]) for r in w]
    outs = [r["max_tokens"] for r in w]
    print(f"{a.out}: {len(w)} requests, prompt mean {np.mean(ins):.1f} max {max(ins)}, "
          f"output mean {np.mean(outs):.1f} max {max(outs)}, total {sum(ins)} + {sum(outs)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
