"""`jpaged bench memory`: the paper's memory-sharing results, measured on this engine.

Two parts (Kwon et al., SOSP 2023, section 6.3 and 6.4):

1. **Sharing within a request** (the paper's Fig. 15): the share of KV blocks
   that sharing saves for parallel sampling (n = 2, 4, 6; random sampling at
   temperature 1) and beam search (width 2, 4, 6) on the Alpaca and ShareGPT workloads.
   After every engine step the benchmark reads the blocks the sequences hold
   (`used_blocks`, physical) and the blocks they would hold without sharing
   (`logical_blocks`, every sequence's block table counted in full); the saving is
   1 - sum(used) / sum(logical) over all steps, the paper's "number of blocks saved by
   sharing divided by the number of total blocks without sharing". Every request generates
   its workload `max_tokens` (capped by `--max-tokens`, `ignore_eos`), all requests are
   queued at once, the pool is large enough that nothing is preempted, and prefix caching
   is off so that only the sharing inside a request counts.
2. **Shared prefix** (the paper's section 6.4, translation with a one-shot and a five-shot
   prompt prefix): the same requests (prefix + "English: <sentence>\\nGerman:", greedy,
   `--prefix-max-tokens` tokens each) through an engine with prefix caching and one
   without. As in the paper, the prefix is in the cache before the timed run (one
   untimed request with it); each engine first runs the workload untimed with another
   prefix of the same length, so the timed run compiles nothing.

`memory_benchmark` returns a dict; `format_table` renders it as Markdown next to the
paper's numbers and `plot` draws a PNG (matplotlib).
"""
from __future__ import annotations

import gc
import json
import time
from typing import Any

from jpaged.arg_utils import add_engine_flags, collect
from jpaged.sampling_params import BeamSearchParams, SamplingParams

from .workloads import load_workload, log, vary

# The paper's reported savings (section 6.3, Fig. 15: ranges over n / width = 2..6, OPT-13B).
PAPER_SAVINGS = {
    ("parallel", "alpaca"): (6.1, 9.8), ("parallel", "sharegpt"): (16.2, 30.5),
    ("beam", "alpaca"): (37.6, 55.2), ("beam", "sharegpt"): (44.3, 66.3),
}
WORKLOADS = {"alpaca": "alpaca_256", "sharegpt": "sharegpt_256"}  # shipped workloads

_HEAD = ("Translate the following English sentences into German, keeping the meaning and "
         "the tone.\n\n")
_EXAMPLES = [
    ("The weather in Berlin was unusually warm for October, so we had lunch outside by the river.",
     "Das Wetter in Berlin war für Oktober ungewöhnlich warm, also aßen wir draußen am Fluss zu Mittag."),
    ("Please send me the report by Friday so that I can review it before the meeting on Monday.",
     "Bitte schicken Sie mir den Bericht bis Freitag, damit ich ihn vor der Besprechung am Montag "
     "prüfen kann."),
    ("My grandmother grew up in a small village in the mountains and still bakes her own bread "
     "every week.",
     "Meine Großmutter ist in einem kleinen Dorf in den Bergen aufgewachsen und backt immer noch "
     "jede Woche ihr eigenes Brot."),
    ("The new library will open next spring and will have a large reading room for children and "
     "a small café.",
     "Die neue Bibliothek wird im nächsten Frühling eröffnet und einen großen Lesesaal für Kinder "
     "und ein kleines Café haben."),
    ("If the train is late again tomorrow, I will take the bus to work instead.",
     "Wenn der Zug morgen wieder Verspätung hat, fahre ich stattdessen mit dem Bus zur Arbeit."),
]


def few_shot_prefix(shots: int) -> str:
    return _HEAD + "".join(f"English: {e}\nGerman: {g}\n\n" for e, g in _EXAMPLES[:shots])


def _record_steps(llm, request_ids: list[str]) -> list[tuple[int, int]]:
    """Step the engine until the requests finish; (used_blocks, logical_blocks) after every step."""
    samples = []
    try:
        while any(i in llm.requests for i in request_ids):
            llm.step()
            kv = llm.kv_cache_stats()
            samples.append((kv["used_blocks"], kv["logical_blocks"]))
    except BaseException:
        for request_id in request_ids:
            llm.abort_request(request_id)
        raise
    return samples


def measure_sharing(llm, workload: list[dict[str, Any]], mode: str, width: int, seed: int = 0) -> dict:
    """Blocks saved by sharing for one (mode, width) over `workload` (all queued at once)."""
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in workload]
    if mode == "parallel":
        requests = [dict(params=SamplingParams(n=width, temperature=1.0, seed=seed + i,
                                               max_tokens=r["max_tokens"], ignore_eos=True))
                    for i, r in enumerate(workload)]
    elif mode == "beam":
        requests = [dict(beam_params=BeamSearchParams(beam_width=width, max_tokens=r["max_tokens"],
                                                      ignore_eos=True)) for r in workload]
    else:
        raise ValueError(f"mode must be 'parallel' or 'beam', got {mode!r}")
    preemptions = llm.scheduler.num_preemptions
    start = time.perf_counter()
    samples = _record_steps(llm, [llm.add_request(p, **kw) for p, kw in zip(prompts, requests)])
    wall = time.perf_counter() - start
    used = sum(u for u, _ in samples)
    logical = sum(lg for _, lg in samples)
    return {"mode": mode, "width": width, "requests": len(workload),
            "saving_pct": 100.0 * (1 - used / logical) if logical else 0.0,
            "peak_used_blocks": max(u for u, _ in samples),
            "peak_logical_blocks": max(lg for _, lg in samples),
            "steps": len(samples), "wall_s": wall,
            "preemptions": llm.scheduler.num_preemptions - preemptions}


def _select(workload, num_requests: int, max_tokens: int | None, max_model_len: int):
    out = []
    for r in workload:
        n = min(r["max_tokens"], max_tokens) if max_tokens else r["max_tokens"]
        if len(r["prompt_token_ids"]) + n <= max_model_len:
            out.append({"prompt_token_ids": r["prompt_token_ids"], "max_tokens": n})
        if len(out) == num_requests:
            break
    return out


def shared_prefix_throughput(model, sentences: list[list[int]], shots: int, max_tokens: int,
                             engine_args: dict, quiet: bool = False) -> dict:
    """Requests = few-shot prefix + sentence; timed with and without prefix caching."""
    from jpaged.entrypoints.llm import LLM
    result: dict[str, Any] = {"shots": shots, "requests": len(sentences), "max_tokens": max_tokens}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for caching in (True, False):
        llm = LLM(model, **{**engine_args, "enable_prefix_caching": caching})
        tok = llm.tokenizer
        prefix = tok(few_shot_prefix(shots)).input_ids
        head, tail = tok("English: ", add_special_tokens=False).input_ids, \
            tok("\nGerman:", add_special_tokens=False).input_ids
        prompts = [{"prompt_token_ids": prefix + head + s + tail} for s in sentences]
        other = vary(prefix, 1)  # warm-up: same shapes, a prefix of its own
        llm.generate([{"prompt_token_ids": other + head + s + tail} for s in sentences], params,
                     use_tqdm=False)
        llm.generate({"prompt_token_ids": prefix + head + tail}, params, use_tqdm=False)  # cache it
        compilations = llm.num_compilations()
        prefill = llm.stats.prefill_tokens
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        key = "cached" if caching else "uncached"
        result["prefix_tokens"] = len(prefix)
        result[f"{key}_wall_s"] = wall
        result[f"{key}_requests_per_s"] = len(prompts) / wall
        result[f"{key}_output_tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / wall
        result[f"{key}_prefill_tokens"] = llm.stats.prefill_tokens - prefill
        result[f"{key}_compilations"] = llm.num_compilations() - compilations
        if caching:
            result["cached_outputs"] = [o.outputs[0].token_ids for o in outs]
        else:
            result["same_outputs"] = result.pop("cached_outputs") == [o.outputs[0].token_ids for o in outs]
        log(f"  {shots}-shot prefix ({len(prefix)} tokens), caching {'on ' if caching else 'off'}: "
             f"{len(prompts) / wall:.2f} requests/s, "
             f"{result[f'{key}_prefill_tokens']} tokens prefilled", quiet)
        del llm
        gc.collect()
    result["speedup"] = result["cached_requests_per_s"] / result["uncached_requests_per_s"]
    return result


def memory_benchmark(model=None, *, workloads=("alpaca", "sharegpt"), widths=(2, 4, 6), modes=("parallel", "beam"),
                     num_requests: int = 32, max_tokens: int | None = None,
                     prefix_requests: int = 64, prefix_max_tokens: int = 32, shots=(1, 5),
                     quiet: bool = False, **engine_args) -> dict:
    """Run both parts (see the module docstring); `shots=()` or `modes=()` skips one."""
    from jpaged.entrypoints.llm import LLM
    from jpaged.models.loader import resolve_model_path

    path = str(resolve_model_path(model))
    engine = {"max_num_seqs": 64, "max_model_len": 2048, "kv_cache_memory": 1 << 30, **engine_args}
    result: dict[str, Any] = {"model": path, "engine": dict(engine), "sharing": [], "prefix": []}
    if modes:
        llm = LLM(path, **{**engine, "enable_prefix_caching": False})
        for name in workloads:
            chosen = _select(load_workload(WORKLOADS.get(name, name)), num_requests, max_tokens,
                             llm.max_model_len)
            log(f"{name}: {len(chosen)} requests, prompts {sum(len(r['prompt_token_ids']) for r in chosen)}"
                 f" tokens, outputs {sum(r['max_tokens'] for r in chosen)} tokens per sample", quiet)
            for mode in modes:
                for width in widths:
                    row = measure_sharing(llm, chosen, mode, width, seed=llm.config.seed)
                    row.update(workload=name, paper_pct=PAPER_SAVINGS.get((mode, name)),
                               prompt_tokens=sum(len(r["prompt_token_ids"]) for r in chosen),
                               output_tokens=sum(r["max_tokens"] for r in chosen))
                    result["sharing"].append(row)
                    log(f"  {mode} {width}: {row['saving_pct']:.1f}% of KV blocks saved "
                         f"({row['steps']} steps, {row['wall_s']:.0f} s)", quiet)
        del llm
        gc.collect()
    if shots:
        alpaca = load_workload(WORKLOADS["alpaca"])
        sentences = [r["prompt_token_ids"] for r in alpaca[:prefix_requests]]
        for k in shots:
            result["prefix"].append(shared_prefix_throughput(
                path, sentences, k, prefix_max_tokens, {**engine, "max_model_len": 1024}, quiet))
    return result


def format_table(result: dict) -> str:
    """Markdown tables of a `memory_benchmark` result."""
    lines = []
    if result["sharing"]:
        lines += ["| workload | method | width | KV blocks saved (jpaged) | paper (OPT-13B, widths 2-6) |",
                  "|---|---|---:|---:|---:|"]
        for r in result["sharing"]:
            paper = r.get("paper_pct")
            method = "parallel sampling (n)" if r["mode"] == "parallel" else "beam search (width)"
            lines.append(f"| {r['workload']} | {method} | {r['width']} | {r['saving_pct']:.1f}% | "
                         + (f"{paper[0]}-{paper[1]}%" if paper else "") + " |")
    if result["prefix"]:
        if lines:
            lines.append("")
        lines += ["| shared prefix | prefix tokens | requests/s, caching on | requests/s, off | speedup "
                  "| prefilled tokens on / off | same outputs |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in result["prefix"]:
            lines.append(f"| {r['shots']}-shot | {r['prefix_tokens']} | {r['cached_requests_per_s']:.2f} | "
                         f"{r['uncached_requests_per_s']:.2f} | {r['speedup']:.2f}x | "
                         f"{r['cached_prefill_tokens']} / {r['uncached_prefill_tokens']} | "
                         f"{'yes' if r['same_outputs'] else 'NO'} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bars of the savings next to the paper's ranges, and the shared-prefix throughputs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, w) for m in ("parallel", "beam") for w in ("alpaca", "sharegpt")
              if any(r["mode"] == m and r["workload"] == w for r in result["sharing"])]
    n = len(panels) + (1 if result["prefix"] else 0)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    for ax, (mode, name) in zip(flat, panels):
        rows_ = [r for r in result["sharing"] if r["mode"] == mode and r["workload"] == name]
        xs = [str(r["width"]) for r in rows_]
        bars = ax.bar(xs, [r["saving_pct"] for r in rows_], color="tab:blue", label="jpaged", zorder=2)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        paper = PAPER_SAVINGS.get((mode, name))
        if paper:
            ax.axhspan(paper[0], paper[1], color="tab:orange", alpha=0.3, zorder=1,
                       label="paper, OPT-13B (range, widths 2-6)")
        ax.set_title(f"{'parallel sampling' if mode == 'parallel' else 'beam search'}, {name}", fontsize=9)
        ax.set_xlabel("n" if mode == "parallel" else "beam width")
        ax.set_ylabel("KV blocks saved (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=6, loc="upper left")
    if result["prefix"]:
        ax = flat[n - 1]
        labels = [f"{r['shots']}-shot\n({r['prefix_tokens']} tok)" for r in result["prefix"]]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [r["uncached_requests_per_s"] for r in result["prefix"]], 0.4,
               label="no prefix caching", color="tab:gray")
        ax.bar([i + 0.2 for i in x], [r["cached_requests_per_s"] for r in result["prefix"]], 0.4,
               label="prefix caching", color="tab:green")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("requests / s")
        ax.set_title("shared prefix (translation)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"KV sharing, {result['model'].split('/')[-1]} on CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line (`jpaged bench memory`, scripts/benchmark_memory.py) --------------------------------

DESCRIPTION = __doc__


def add_cli_args(parser) -> None:
    parser.add_argument("--workloads", nargs="+", default=["alpaca", "sharegpt"], metavar="NAME",
                        help="workloads for the sharing part: alpaca, sharegpt (the shipped "
                             "alpaca_256 and sharegpt_256), or workload files [default: alpaca sharegpt]")
    parser.add_argument("--widths", nargs="+", type=int, default=[2, 4, 6], metavar="W",
                        help="n / beam widths [default: 2 4 6]")
    parser.add_argument("--modes", nargs="*", default=["parallel", "beam"],
                        choices=["parallel", "beam"], help="sharing part: which methods (none skips it)")
    parser.add_argument("--num-requests", type=int, default=32, metavar="K",
                        help="first K requests of each workload [default: 32]")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="cap every request's output length at N tokens [default: no cap]")
    parser.add_argument("--shots", nargs="*", type=int, default=[1, 5], metavar="K",
                        help="shared-prefix part: few-shot prefixes (none skips it) [default: 1 5]")
    parser.add_argument("--prefix-requests", type=int, default=64, metavar="K",
                        help="shared-prefix part: requests per prefix [default: 64]")
    parser.add_argument("--prefix-max-tokens", type=int, default=32, metavar="N",
                        help="shared-prefix part: output tokens per request [default: 32]")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="draw the plot (matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    add_engine_flags(parser)


def main(args) -> int:
    result = memory_benchmark(args.model, workloads=args.workloads, widths=args.widths, modes=args.modes,
                              num_requests=args.num_requests, max_tokens=args.max_tokens,
                              prefix_requests=args.prefix_requests,
                              prefix_max_tokens=args.prefix_max_tokens, shots=args.shots,
                              quiet=args.quiet, **collect(args, "engine."))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    print(format_table(result), flush=True)
    return 0
