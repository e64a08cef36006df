"""The `jpaged` command line: `generate`, `chat` and `bench throughput`.

Engine flags are generated from `EngineConfig`'s fields and sampling flags from
`SamplingParams`'s, so every engine argument is a flag (`kv_cache_memory` ->
`--kv-cache-memory`) and a new field becomes one without edits here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import types
import typing
from typing import Any

from .bench import WARMUP_MODES, format_result, throughput_benchmark
from .config import ATTENTION_BACKENDS, DTYPES, EngineConfig
from .sampling_params import SamplingParams

_UNITS = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'8000000', '8e6', '512MiB', '2GiB', '1.5GB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 8000000, 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


# Engine fields whose values are bytes and so take units; flags renamed to avoid a clash
# with a sampling flag of the same name.
_BYTE_FIELDS = {"kv_cache_memory", "swap_space"}
_ENGINE_RENAMED = {"seed": "engine_seed"}
_CHOICES = {"dtype": DTYPES, "kv_cache_dtype": DTYPES, "attention_backend": ATTENTION_BACKENDS,
            "preemption_mode": ("recompute", "swap")}

ENGINE_HELP = {
    "block_size": "tokens per KV cache block, a power of two",
    "kv_cache_memory": "bytes for the KV pool, sized after the weights are loaded; takes units "
                       "(8000000, 512MiB, 2GiB) [default: 2 GiB, or a quarter of RAM if less]",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "most tokens in one step; longer prompts are prefilled in chunks",
    "max_model_len": "most tokens (prompt + output) of one sequence [default: the model's "
                     "context length]",
    "dtype": "weights and compute dtype; auto = float32 on CPU, bfloat16 on GPU",
    "kv_cache_dtype": "KV pool dtype; auto = float32 on CPU, the model's dtype elsewhere",
    "attention_backend": "paged attention implementation; auto picks the platform's",
    "seed": "engine seed: draws the seeds of requests that have no --seed",
    "enable_prefix_caching": "share the KV blocks of common prompt prefixes",
    "preemption_mode": "what to do with a request when the pool is full",
    "swap_space": "bytes of host memory for swapped-out blocks; takes units [default: 1 GiB]",
    "max_logprobs": "largest --logprobs a request may ask for",
    "compilation_cache_dir": "XLA's persistent compilation cache; '' disables it "
                             "[default: ~/.cache/jpaged/xla]",
    "scan_layers": "run the layers under a scan: compile time does not grow with depth, "
                   "steps are slower (weights copied out of the stack) [default: unrolled]",
}

SAMPLING_HELP = {
    "n": "completions per prompt",
    "best_of": "sample this many and return the n with the highest log-probability",
    "temperature": "0 = greedy",
    "top_p": "nucleus sampling: keep the smallest set of tokens with this much probability",
    "top_k": "keep the k most likely tokens; -1 disables",
    "min_p": "drop tokens less likely than min_p times the most likely one",
    "repetition_penalty": "> 1 discourages tokens already in the prompt or output",
    "presence_penalty": "subtracted from the logit of every token already generated",
    "frequency_penalty": "subtracted once per earlier occurrence of a token",
    "seed": "per-request seed: the same seed gives the same output, whatever the batch",
    "max_tokens": "most tokens to generate ('none' = up to max_model_len)",
    "min_tokens": "generate at least this many before EOS or a stop may end the output",
    "stop": "stop when this string appears (repeat the flag for several)",
    "stop_token_ids": "stop when one of these token ids is generated",
    "ignore_eos": "keep generating after the end-of-sequence token",
    "include_stop_str_in_output": "keep the matched stop string in the text",
    "logprobs": "return the log-probabilities of the sampled and this many top tokens (--json)",
    "skip_special_tokens": "leave special tokens out of the text",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _add_dataclass_flags(group, cls, *, prefix: str, help: dict[str, str],
                         rename: dict[str, str] | None = None, only: set[str] | None = None,
                         defaults: dict[str, Any] | None = None) -> None:
    """One flag per dataclass field, typed from its annotation; its value lands in
    `args.<prefix><field>` only when the flag is given, so the dataclass's own default
    applies otherwise (`defaults` overrides it for this command)."""
    hints = typing.get_type_hints(cls)
    rename, defaults = rename or {}, defaults or {}
    for field in dataclasses.fields(cls):
        name = field.name
        if only is not None and name not in only:
            continue
        hint = hints[name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        optional = type(None) in args
        base = next((a for a in args if a is not type(None) and typing.get_origin(a) is not list),
                    hint) if args else hint
        listed = next((a for a in (args or (hint,)) if typing.get_origin(a) is list), None)
        default = defaults.get(name, field.default)
        shown = "" if "[default" in help.get(name, "") else f" [default: {default}]"
        kw: dict[str, Any] = dict(dest=prefix + name, default=argparse.SUPPRESS,
                                  help=help.get(name, f"{cls.__name__}.{name}") + shown)
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif listed is not None and base is str:
            kw.update(action="append", metavar="STR")
        elif listed is not None:
            kw.update(nargs="+", type=typing.get_args(listed)[0], metavar="ID")
        elif name in _BYTE_FIELDS:
            kw.update(type=parse_bytes, metavar="BYTES")
        elif base is int:
            kw.update(type=_optional_int if optional else int, metavar="N")
        elif base is float:
            kw.update(type=float, metavar="X")
        else:
            kw.update(type=_optional_str if optional else str, metavar="STR")
        if name in _CHOICES:
            kw.update(choices=_CHOICES[name], metavar=None)
        group.add_argument(_flag(rename.get(name, name)), **kw)


def _collect(args: argparse.Namespace, prefix: str, defaults: dict[str, Any] | None = None) -> dict:
    got = dict(defaults or {})
    got.update({k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)})
    return got


def _add_engine_flags(parser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Hugging Face model folder or a .gguf file [default: the embedded "
                             "SmolLM2-135M-Instruct]")
    group = parser.add_argument_group("engine arguments (jpaged.EngineConfig)")
    _add_dataclass_flags(group, EngineConfig, prefix="engine.", help=ENGINE_HELP,
                         rename=_ENGINE_RENAMED)


def _add_sampling_flags(parser, defaults: dict[str, Any]) -> None:
    group = parser.add_argument_group("sampling (jpaged.SamplingParams)")
    _add_dataclass_flags(group, SamplingParams, prefix="sampling.", help=SAMPLING_HELP,
                         defaults=defaults)


_GENERATE_DEFAULTS = {"max_tokens": 128}
_CHAT_DEFAULTS = {"max_tokens": 512}


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _load(args):
    from .llm import LLM
    from jpaged.models.loader import resolve_model_path

    path = resolve_model_path(args.model)
    _log(args, f"Loading {path} ...")
    llm = LLM(str(path), **_collect(args, "engine."))
    kv = llm.kv_cache_stats()
    _log(args, f"Loaded in {llm.load_s:.1f} s: KV pool of {kv['total_blocks']} blocks x "
               f"{kv['block_size']} tokens ({kv['pool_bytes'] / 2**20:.0f} MiB), "
               f"max_model_len {llm.max_model_len}")
    return llm


# ---- generate -------------------------------------------------------------------------------


def _output_dict(out) -> dict:
    d = dataclasses.asdict(out)
    for comp in d["outputs"]:  # JSON keys are strings: make the token ids explicit
        if comp["logprobs"] is not None:
            comp["logprobs"] = [{str(tid): lp for tid, lp in entry.items()} for entry in comp["logprobs"]]
    return d


def cmd_generate(args) -> int:
    prompts = list(args.prompts)
    if not prompts or prompts == ["-"]:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt: give PROMPT arguments, or '-' / a pipe to read one from stdin")
        prompts = [sys.stdin.read().rstrip("\n")]
    params = SamplingParams(**_collect(args, "sampling.", _GENERATE_DEFAULTS))
    llm = _load(args)
    start = time.perf_counter()
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        outs = llm.chat([system + [{"role": "user", "content": p}] for p in prompts], params,
                        use_tqdm=not args.quiet)
    else:
        outs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    _log(args, f"Generated {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s, "
               f"{llm.num_compilations()} step compilations)")
    if args.json:
        print(json.dumps([_output_dict(o) for o in outs], indent=2))
        return 0
    many = len(outs) > 1 or params.n > 1
    for i, out in enumerate(outs):
        for comp in out.outputs:
            if many:
                print(f"--- prompt {i}" + (f", completion {comp.index}" if params.n > 1 else "")
                      + f" (finish: {comp.finish_reason})")
            print(comp.text)
    return 0


# ---- chat -----------------------------------------------------------------------------------


def stream_request(llm, prompt, params: SamplingParams, out=None):
    """Queue one request and step the engine until it finishes, writing its text to
    `out` as it grows. Text that could still turn out to be the start of a stop string
    is held back until it cannot. Returns the final RequestOutput."""
    out = out or sys.stdout
    request_id = llm.add_request(prompt, params)
    holdback = max((len(s) for s in params.stop), default=1) - 1
    printed = 0
    try:
        while True:
            for o in llm.step():
                if o.request_id != request_id:
                    continue
                text = o.outputs[0].text
                end = len(text) if o.finished else len(text) - holdback
                if end > printed:
                    out.write(text[printed:end])
                    out.flush()
                    printed = end
                if o.finished:
                    return o
            if request_id not in llm.requests:
                raise RuntimeError(f"request {request_id} left the engine without finishing")
    except BaseException:
        llm.abort_request(request_id)
        raise


def _fit_history(llm, messages: list[dict]) -> list[int] | None:
    """Token ids of the conversation, dropping its oldest exchanges until the prompt
    fits max_model_len; None if even the last user message alone does not fit."""
    while True:
        ids = list(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))
        if len(ids) < llm.max_model_len:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None
        del messages[first:first + 2]  # the oldest user message and its reply
        print("[history too long for max_model_len: dropped the oldest exchange]",
              file=sys.stderr, flush=True)


def chat_loop(llm, params: SamplingParams, system: str | None = None, stdin=None, stdout=None) -> list[dict]:
    """Read user lines until EOF or /exit, stream each reply, keep the conversation.
    `/reset` clears the history. Returns the conversation."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    if interactive:
        print("Type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ") if interactive and stdin is sys.stdin else stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:
            print(file=stdout)
            break
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit_history(llm, messages)
        if ids is None:
            print(f"[message too long: over max_model_len={llm.max_model_len} tokens]",
                  file=sys.stderr, flush=True)
            messages.pop()
            continue
        try:
            final = stream_request(llm, {"prompt_token_ids": ids}, params, stdout)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr, flush=True)
            messages.pop()
            continue
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": final.outputs[0].text})
    return messages


def cmd_chat(args) -> int:
    params = SamplingParams(**_collect(args, "sampling.", _CHAT_DEFAULTS))
    if params.best_of != 1:
        raise ValueError("chat streams one reply: --n and --best-of must be 1")
    llm = _load(args)
    chat_loop(llm, params, args.system)
    return 0


# ---- bench ----------------------------------------------------------------------------------


def cmd_bench_throughput(args) -> int:
    result = throughput_benchmark(
        args.workload, args.model, num_requests=args.num_requests, temperature=args.temperature,
        warmup=args.warmup, baseline=args.baseline, hf_batch_size=args.hf_batch_size,
        quiet=args.quiet, **_collect(args, "engine."))
    print(json.dumps(result, indent=2) if args.json else format_result(result), flush=True)
    return 0


BENCH_THROUGHPUT_DESCRIPTION = """\
Replay a workload (a JSON list of {"prompt_token_ids": [...], "max_tokens": N}) through
LLM.generate with all requests queued at once; every request generates exactly N tokens
(ignore_eos, greedy unless --temperature). Prints output and total tokens/s, KV pool
utilization (tokens stored / slots allocated, per step: mean and peak), preemptions and
step compilations during the timed run, load and warm-up seconds.

Warm-up (--warmup): 'full' (default) first runs the whole workload once, untimed, with
every prompt token id shifted by one. The lengths are the same, so the scheduler makes
the same steps and every step shape the timed run needs is compiled (the JSON's
'compilations' shows 0 when it worked), but no prompt of the timed run can be served
from a cache the warm-up filled. The timed run then measures steady-state serving;
compile time is reported in warmup_s, and start-up in load_s. 'none' times a cold
engine: compilations are then part of wall_s (the persistent XLA cache,
--compilation-cache-dir, can still serve them from disk).

--baseline hf then runs the same workload through transformers generate in this
process (after freeing jpaged's pool): static batches of --hf-batch-size in workload
order, left padding, greedy, each batch generating its longest max_tokens, counting
only each request's own N as output tokens; it reports hf_output_tokens_per_s and
speedup_vs_hf."""


# ---- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="jpaged", description="jpaged: an LLM serving engine in JAX with PagedAttention.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text for one or more prompts",
                         description="Generate a completion for each PROMPT (all batched "
                                     "together) and print it.")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT",
                     help="prompt text; none or '-' reads one prompt from stdin")
    gen.add_argument("--chat", action="store_true",
                     help="send each prompt as a user message through the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true",
                     help="print the RequestOutputs as JSON (with logprobs if asked)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars or timings on stderr")
    _add_engine_flags(gen)
    _add_sampling_flags(gen, _GENERATE_DEFAULTS)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat that streams the replies",
                          description="Chat with the model: each line of stdin is a user message; "
                                      "the reply streams as it is generated. /reset clears the "
                                      "history; /exit or end of input quits.")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--quiet", action="store_true", help="no load message on stderr")
    _add_engine_flags(chat)
    _add_sampling_flags(chat, _CHAT_DEFAULTS)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    tp = bench_sub.add_parser("throughput", help="offline throughput on a workload file",
                              description=BENCH_THROUGHPUT_DESCRIPTION, formatter_class=fmt)
    tp.add_argument("--workload", required=True, metavar="FILE.json",
                    help='JSON list of {"prompt_token_ids": [...], "max_tokens": N}')
    tp.add_argument("--num-requests", type=int, default=None, metavar="K",
                    help="use only the first K requests")
    tp.add_argument("--json", action="store_true", help="print one JSON object")
    tp.add_argument("--warmup", choices=WARMUP_MODES, default="full",
                    help="see above [default: full]")
    tp.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature of every request [default: 0, greedy]")
    tp.add_argument("--baseline", choices=("hf",), default=None,
                    help="also run the workload through transformers generate and report the ratio")
    tp.add_argument("--hf-batch-size", type=int, default=16, metavar="B",
                    help="requests per static transformers batch [default: 16]")
    tp.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    _add_engine_flags(tp)
    tp.set_defaults(func=cmd_bench_throughput)
    # Imported here: the server and its benchmark need FastAPI/httpx, offline use does not.
    from .bench_memory import BENCH_MEMORY_DESCRIPTION, add_bench_memory_arguments, cmd_bench_memory
    from .bench_serving import add_bench_serving_arguments, cmd_bench_serving
    from .server import add_serve_arguments, cmd_serve
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server", formatter_class=fmt)
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    bs = bench_sub.add_parser("serving", help="serving latency and throughput against a server",
                              formatter_class=fmt)
    add_bench_serving_arguments(bs)
    bs.set_defaults(func=cmd_bench_serving)
    bm = bench_sub.add_parser("memory", help="KV blocks saved by sharing (the paper's section 6.3)",
                              description=BENCH_MEMORY_DESCRIPTION, formatter_class=fmt)
    add_bench_memory_arguments(bm)
    _add_engine_flags(bm)
    bm.set_defaults(func=cmd_bench_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, without a traceback
        if os.environ.get("JPAGED_DEBUG"):
            raise
        print(f"jpaged {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
