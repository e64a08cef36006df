"""`jpaged convert MODEL OUT_DIR`: write MODEL (a .gguf file, an HF folder; none: the embedded
default) as a folder whose weights are an orbax checkpoint that every tensor_parallel_size
restores straight into its devices' shards (`jpaged.runner.checkpoint`). `jpaged.LLM(OUT_DIR)`
and `--model OUT_DIR` load it."""
from __future__ import annotations

import sys
import time


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a .gguf file or a Hugging Face folder (default: the embedded model)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) folder to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the stored weights (float32: exact for every source; "
                             "engines cast to their --dtype on load)")


def main(args) -> int:
    from jpaged.runner.checkpoint import convert
    start = time.perf_counter()
    out = convert(args.model, args.out_dir, args.dtype)
    print(f"Wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(out)
    return 0
