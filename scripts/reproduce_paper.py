"""Reproduce the vLLM paper's evaluation with jpaged: its baselines are KV allocation
policies of this engine (`kv_policy`), so runs differ only in how KV memory is managed.

    python scripts/reproduce_paper.py            # the full run (default model; hours on 2 cores)
    python scripts/reproduce_paper.py --medium           # fewer points and requests (~1.5 h)
    python scripts/reproduce_paper.py --quick --model DIR   # a few minutes (CI: a tiny model)
    python scripts/reproduce_paper.py --only fig2,fig12 --figures docs/paper

Each data point is one JSON under --out (default ~/.cache/jpaged/paper/<scale>), skipped
when present: an interrupted run resumes where it stopped. Then results.json (every point,
the budgets, sustained rates and their ratios to `paged`, the seconds each point took) and
the PNGs go to --figures (default: docs/paper, or --out for --quick).

Figures (the paper's numbers; budgets and workloads in jpaged/benchmarks/paper.py):
- fig2: the pool's breakdown per policy over a ShareGPT run (token states, reserved,
  internal and external fragmentation, free);
- fig12: normalized latency and mean batch size against request rate, per policy, on ShareGPT
  and Alpaca (Figs. 12-13); rates are fractions of `paged`'s offline request rate; the rate
  each policy sustains under a bound of --bound-factor times `paged`'s lowest-rate latency;
- fig14: parallel sampling and beam search throughput with block sharing on and off (Alpaca);
- fig18a: the paged attention kernel against contiguous-cache attention (`jpaged bench attention`);
- fig18b: normalized latency against block size (ShareGPT and Alpaca, one rate);
- fig19: swap against recompute: (a) seconds to move a prompt's blocks out and back, or to
  prefill it again, per block size; (b) normalized latency with all requests at once, which
  preempts where their final lengths sum past the pool (the full scale);
- peers: transformers and vLLM's CPU build on the same workload files (scripts/peers/paper_peers.py;
  not in --quick).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from jpaged.benchmarks import online, paper
from jpaged.benchmarks.workloads import load_workload

REPO = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ("fig2", "fig12", "fig14", "fig18a", "fig18b", "fig19", "peers")
SCALES = {
    "full": dict(requests={"sharegpt": 64, "alpaca": 192}, fractions=(0.25, 0.5, 0.75, 1.0, 1.25),
                 block_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256), swap_block_sizes=(8, 16, 32, 64, 128, 256),
                 block_size_workloads=("sharegpt", "alpaca"), widths=(2, 4, 6), sharing_requests=32,
                 engine=dict(max_num_seqs=128), attention="", swap_tokens=1024),
    # The full run's figures at about a third of its points and half its requests (~1.5 h).
    "medium": dict(requests={"sharegpt": 32, "alpaca": 96}, fractions=(0.5, 1.5),
                   block_sizes=(4, 16, 64, 256), swap_block_sizes=(16, 64, 256),
                   block_size_workloads=("sharegpt",), widths=(2, 4), sharing_requests=16,
                   engine=dict(max_num_seqs=128), attention="", swap_tokens=1024),
    # Every new pool shape compiles the step's executables again: few shapes, small steps.
    "quick": dict(requests={"sharegpt": 6, "alpaca": 12}, fractions=(0.5, 1.0),
                  block_sizes=(16, 32), swap_block_sizes=(16,), block_size_workloads=("sharegpt",),
                  widths=(2,), sharing_requests=3, engine=dict(max_num_seqs=4, max_num_batched_tokens=128),
                  attention="--quick", swap_tokens=64),
}
WORKLOAD_FILES = {"sharegpt": "sharegpt_256", "alpaca": "alpaca_256"}


class Run:
    """Points on disk, and one engine at a time kept between consecutive points of one setup."""

    def __init__(self, args):
        self.args, self.scale = args, SCALES[args.scale]
        self.fractions = self.scale["fractions"] if args.fractions is None else \
            tuple(float(f) for f in args.fractions.split(",") if f)
        sizes = args.block_sizes and tuple(int(b) for b in args.block_sizes.split(","))
        self.block_sizes = sizes or self.scale["block_sizes"]
        self.swap_block_sizes = sizes or self.scale["swap_block_sizes"]
        self.out = pathlib.Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        from jpaged.models.loader import load_config, resolve_model_path
        self.model = str(resolve_model_path(args.model))
        self.model_config = load_config(self.model)
        self.max_model_len = min(paper.PAPER_MAX_MODEL_LEN, self.model_config.max_position_embeddings)
        self.workloads = {k: self._workload(k) for k in WORKLOAD_FILES}
        self.budgets = {k: paper.budget(w, k, self.model_config) for k, w in self.workloads.items()}
        self._engine, self._engine_key = None, None

    def _workload(self, kind):
        fits = [r for r in load_workload(WORKLOAD_FILES[kind])
                if len(r["prompt_token_ids"]) + r["max_tokens"] <= self.max_model_len]
        return fits[:self.scale["requests"][kind]]

    def point(self, name: str, measure) -> dict:
        """The JSON of point `name`, measured now (and saved) unless it is on disk."""
        path = self.out / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = measure()
        result["point_s"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        return result

    def engine(self, kind: str, **overrides):
        """A warmed-up engine for workload `kind`'s budget with `overrides` (the last one made
        is reused while the setup stays the same)."""
        from jpaged import LLM
        args = dict(dtype="float32", max_model_len=self.max_model_len, enable_prefix_caching=False,
                    kv_cache_memory=self.budgets[kind]["kv_cache_memory"], **self.scale["engine"])
        args.update(overrides)
        key = json.dumps(args, sort_keys=True)
        if key != self._engine_key:
            self._engine = None
            gc.collect()
            self._engine = LLM(self.model, **args)
            self._engine.warmup(use_tqdm=False)
            self._engine_key = key
        return self._engine


def fig12(run: Run) -> dict:
    """Offline capacity, then the rate sweep, per workload and policy (fig2 reads the
    ShareGPT offline points)."""
    res = {}
    for kind, workload in run.workloads.items():
        offline, curves, capacity = {}, {}, None
        for p in paper.POLICIES:  # paged first: its offline rate sets the others' rates
            offline[p] = run.point(f"fig12/{kind}/{p}/inf", lambda p=p: online.replay(
                run.engine(kind, kv_policy=p), workload, math.inf))
            capacity = capacity or offline["paged"]["requests_per_s"]
            curves[p] = [run.point(f"fig12/{kind}/{p}/{f:g}", lambda p=p, f=f: online.replay(
                run.engine(kind, kv_policy=p), workload, f * capacity, seed=1)) for f in run.fractions]
        paged_tps = offline["paged"]["output_tokens_per_s"]
        res[kind] = {"capacity_requests_per_s": capacity, "offline": offline, "curves": curves,
                     # all requests at once: how much more paged generates per second
                     "offline_ratio_to_paged": {p: paged_tps / o["output_tokens_per_s"] for p, o in offline.items()}}
        if run.fractions:
            bound = run.args.bound_factor * curves["paged"][0]["normalized_latency_mean_s"]
            sustained = {p: online.sustained_rate(curves[p], bound) for p in paper.POLICIES}
            res[kind].update(
                latency_bound_s=bound, sustained_rate=sustained,
                # within the bound at the highest rate measured: the sustained rate is a lower bound
                sustained_at_top={p: max(c["normalized_latency_mean_s"] for c in curves[p]) <= bound
                                  for p in paper.POLICIES},
                ratio_to_paged={p: (sustained["paged"] / r if r else math.inf) for p, r in sustained.items()})
    return res


def fig14(run: Run) -> list:
    wl = run.workloads["alpaca"][:run.scale["sharing_requests"]]
    rows = []
    for share in (True, False):
        for mode in ("parallel", "beam"):
            for width in run.scale["widths"]:
                rows.append(run.point(f"fig14/{mode}/{width}/{'shared' if share else 'unshared'}",
                                      lambda m=mode, w=width, s=share: paper.offline_sharing(
                                          run.engine("alpaca", enable_block_sharing=s), wl, m, w)))
    return rows


def fig18b(run: Run, capacity: dict) -> dict:
    return {kind: [run.point(f"fig18b/{kind}/bs{bs}", lambda k=kind, b=bs: online.replay(
        run.engine(k, block_size=b), run.workloads[k], 0.75 * capacity[k], seed=2))
        for bs in run.block_sizes] for kind in run.scale["block_size_workloads"]}


def fig19(run: Run) -> dict:
    micro, e2e = [], {"recompute": [], "swap": []}
    for bs in run.swap_block_sizes:
        micro.append(run.point(f"fig19a/bs{bs}", lambda b=bs: paper.swap_vs_recompute(
            run.engine("sharegpt", block_size=b, preemption_mode="swap"), run.scale["swap_tokens"])))
        for mode in e2e:
            # all requests at once: the most memory pressure the workload makes (it preempts
            # where the requests' final lengths sum past the pool, as they do at the full scale)
            e2e[mode].append(run.point(f"fig19b/{mode}/bs{bs}", lambda b=bs, m=mode: online.replay(
                run.engine("sharegpt", block_size=b, preemption_mode=m), run.workloads["sharegpt"], math.inf)))
    return {"micro": micro, "end_to_end": e2e}


def fig18a(run: Run) -> dict:
    def measure():
        cmd = [sys.executable, str(REPO / "scripts" / "benchmark_attention.py"), "--json"]
        cmd += [run.scale["attention"]] if run.scale["attention"] else []
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return run.point("fig18a", measure)


def peers(run: Run) -> dict:
    script = REPO / "scripts" / "peers" / "paper_peers.py"
    out = run.out / "peers"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--workloads", *WORKLOAD_FILES.values(),
                    "--num-requests", str(run.scale["requests"]["sharegpt"])], check=True)
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few requests and points: minutes")
    p.add_argument("--medium", action="store_true",
                   help="about a third of the full run's points, half its requests")
    p.add_argument("--model", default=None, help="model path [default: the default model]")
    p.add_argument("--out", default=None, help="one JSON per point [default: ~/.cache/jpaged/paper/<scale>]")
    p.add_argument("--figures", default=None, help="results.json and PNGs [default: docs/paper; --quick: --out]")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    p.add_argument("--fractions", default=None, metavar="F,F",
                   help="fig12's request rates as fractions of paged's offline rate [default: the scale's]; "
                        "'' for the offline points alone (all requests at once)")
    p.add_argument("--block-sizes", default=None, metavar="B,B",
                   help="fig18b's and fig19's block sizes [default: the scale's]")
    p.add_argument("--bound-factor", type=float, default=4.0,
                   help="the latency bound of the sustained rate, times paged's lowest-rate latency")
    args = p.parse_args(argv)
    scale = args.scale = "quick" if args.quick else "medium" if args.medium else "full"
    args.out = args.out or str(pathlib.Path.home() / ".cache" / "jpaged" / "paper" / scale)
    args.figures = pathlib.Path(args.figures or (args.out if args.quick else REPO / "docs" / "paper"))
    only = set(args.only.split(","))
    if only - set(FIGURES):
        p.error(f"--only: unknown {sorted(only - set(FIGURES))}; choose from {FIGURES}")
    if args.quick:
        only.discard("peers")
    run = Run(args)
    start = time.perf_counter()
    results = {"scale": scale, "model": run.model, "max_model_len": run.max_model_len,
               "budgets": run.budgets, "paper": paper.PAPER,
               "workloads": {k: {"file": WORKLOAD_FILES[k], "requests": len(w),
                                 "mean_prompt_tokens": sum(len(r["prompt_token_ids"]) for r in w) / len(w),
                                 "mean_output_tokens": sum(r["max_tokens"] for r in w) / len(w)}
                             for k, w in run.workloads.items()}}
    if only & {"fig2", "fig12", "fig18b", "fig19"}:
        results["fig12"] = fig12(run)
        results["fig2"] = {p: results["fig12"]["sharegpt"]["offline"][p]["kv_memory_shares"]
                           for p in paper.POLICIES}  # shares of the pool
        results["fig2_in_use"] = {p: {k: v / (1 - s["free"]) for k, v in s.items() if k != "free"}
                                  for p, s in results["fig2"].items() if s["free"] < 1}
        capacity = {k: v["capacity_requests_per_s"] for k, v in results["fig12"].items()}
        if "fig18b" in only:
            results["fig18b"] = fig18b(run, capacity)
        if "fig19" in only:
            results["fig19"] = fig19(run)
    if "fig14" in only:
        results["fig14"] = fig14(run)
    if "fig18a" in only:
        results["fig18a"] = fig18a(run)
    if "peers" in only:
        results["peers"] = peers(run)
    points = sorted(run.out.rglob("*.json"))
    results["points"] = len(points)
    results["points_s"] = sum(json.loads(p.read_text()).get("point_s", 0.0) for p in points
                              if p.parent.name != "peers")
    results["this_run_s"] = time.perf_counter() - start
    args.figures.mkdir(parents=True, exist_ok=True)
    (args.figures / "results.json").write_text(json.dumps(results, indent=1))
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from paper_plots import plot_all  # beside this script
    for path in plot_all(results, args.figures):
        print(path)
    print(args.figures / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
