"""`jpaged generate`: complete one or more prompts (batched together) and print them."""
from __future__ import annotations

import dataclasses
import json
import sys
import time

from jpaged.arg_utils import add_engine_flags, add_sampling_flags, collect
from jpaged.sampling_params import SamplingParams

GENERATE_DEFAULTS = {"max_tokens": 128}


def log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def load_llm(args):
    """The engine of a command's `--model` and engine flags, with a line on what was loaded."""
    from jpaged.entrypoints.llm import LLM
    from jpaged.models.loader import resolve_model_path

    path = resolve_model_path(args.model)
    log(args, f"Loading {path} ...")
    llm = LLM(str(path), **collect(args, "engine."))
    kv = llm.kv_cache_stats()
    log(args, f"Loaded in {llm.load_s:.1f} s: KV pool of {kv['total_blocks']} blocks x "
              f"{kv['block_size']} tokens ({kv['pool_bytes'] / 2**20:.0f} MiB), "
              f"max_model_len {llm.max_model_len}")
    return llm


def sampling_params(args, llm, command_defaults: dict) -> SamplingParams:
    """The sampling flags given, over the model's generation config, over the command's
    defaults (a flag left out takes what a request without it would)."""
    return SamplingParams(**collect(args, "sampling.", {**command_defaults, **llm.generation_config}))


def add_arguments(parser) -> None:
    parser.add_argument("prompts", nargs="*", metavar="PROMPT",
                        help="prompt text; none or '-' reads one prompt from stdin")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user message through the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--json", action="store_true",
                        help="print the RequestOutputs as JSON (with logprobs if asked)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or timings on stderr")
    add_engine_flags(parser)
    add_sampling_flags(parser, GENERATE_DEFAULTS)


def output_dict(out) -> dict:
    d = dataclasses.asdict(out)
    for comp in d["outputs"]:  # JSON keys are strings: make the token ids explicit
        if comp["logprobs"] is not None:
            comp["logprobs"] = [{str(tid): lp for tid, lp in entry.items()} for entry in comp["logprobs"]]
    return d


def main(args) -> int:
    prompts = list(args.prompts)
    if not prompts or prompts == ["-"]:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt: give PROMPT arguments, or '-' / a pipe to read one from stdin")
        prompts = [sys.stdin.read().rstrip("\n")]
    SamplingParams(**collect(args, "sampling.", GENERATE_DEFAULTS))  # bad flags fail before loading
    llm = load_llm(args)
    params = sampling_params(args, llm, GENERATE_DEFAULTS)
    start = time.perf_counter()
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        outs = llm.chat([system + [{"role": "user", "content": p}] for p in prompts], params,
                        use_tqdm=not args.quiet)
    else:
        outs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    log(args, f"Generated {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s, "
              f"{llm.num_compilations()} step compilations)")
    if args.json:
        print(json.dumps([output_dict(o) for o in outs], indent=2))
        return 0
    many = len(outs) > 1 or params.n > 1
    for i, out in enumerate(outs):
        for comp in out.outputs:
            if many:
                print(f"--- prompt {i}" + (f", completion {comp.index}" if params.n > 1 else "")
                      + f" (finish: {comp.finish_reason})")
            print(comp.text)
    return 0
