"""Plot `serve_bench.py --json` results of several servers side by side: output tokens/s,
mean TTFT and mean TPOT against request rate (the saturating rate `inf` drawn at the right).

    python scripts/peers/plot_serving.py vllm.jsonl jpaged.jsonl --out docs/serving_random.png
"""
from __future__ import annotations

import argparse
import json
import pathlib


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="serve_bench.py --json outputs, one server each")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for path in args.results:
        rows = load(path)
        finite = [float(r["request_rate"]) for r in rows if r["request_rate"] != "inf"]
        top = max(finite, default=1.0) * 1.5
        x = [float(r["request_rate"]) if r["request_rate"] != "inf" else top for r in rows]
        label = rows[0]["server"]
        for ax, key, name in zip(axes, ("output_throughput", "mean_ttft_ms", "mean_tpot_ms"),
                                 ("output tokens/s", "mean TTFT (ms)", "mean TPOT (ms)")):
            ax.plot(x, [r[key] for r in rows], "o-", label=label)
            ax.set(xlabel="request rate (req/s; rightmost: all at once)", ylabel=name)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
