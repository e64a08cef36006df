"""The `jpaged` command: subcommands and error reporting.

Every engine argument is a flag (`jpaged.arg_utils`), the same on every subcommand.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import chat, convert, generate, serve, worker


def build_parser() -> argparse.ArgumentParser:
    from jpaged.benchmarks import attention, memory, serving, step, throughput, weights
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="jpaged", description="jpaged: an LLM serving engine in JAX with PagedAttention.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = [
        ("generate", generate, "generate text for one or more prompts",
         "Generate a completion for each PROMPT (all batched together) and print it."),
        ("chat", chat, "interactive chat that streams the replies", chat.__doc__),
        ("serve", serve, "OpenAI-compatible HTTP server", serve.__doc__),
        ("convert", convert, "write a model as a checkpoint that loads straight into its shards",
         convert.__doc__),
        ("worker", worker, "follow process 0 of a model split over several processes",
         worker.__doc__),
    ]
    for name, module, help_text, description in commands:
        p = sub.add_parser(name, help=help_text, description=description, formatter_class=fmt)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, module, help_text in [
            ("throughput", throughput, "offline throughput on a workload"),
            ("serving", serving, "serving latency and throughput against a server"),
            ("memory", memory, "KV blocks saved by sharing (the paper's section 6.3)"),
            ("step", step, "decode step time next to this machine's floors"),
            ("attention", attention, "paged against contiguous decode attention (Fig. 18a)"),
            ("weights", weights, "new weights in place against a rebuild and a reload; sleep "
                                 "and wake")]:
        p = bench_sub.add_parser(name, help=help_text, description=module.DESCRIPTION,
                                 formatter_class=fmt)
        module.add_cli_args(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jpaged.exceptions import DistributedError
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, DistributedError) as e:  # bad input: say what, without a traceback
        if os.environ.get("JPAGED_DEBUG"):
            raise
        print(f"jpaged {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
