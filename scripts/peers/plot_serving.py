"""Plot `serve_bench.py --json` results of several servers side by side: output tokens/s,
mean TTFT and mean TPOT against request rate (the saturating rate `inf` drawn at the right).

    python scripts/peers/plot_serving.py random.jsonl --out docs/serving_random.png --table

The rows of all the files given are grouped by their server. `--table` also prints them as
the README's Markdown table, the best server's figure in bold per rate.
"""
from __future__ import annotations

import argparse
import json
import pathlib


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="serve_bench.py --json outputs")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    p.add_argument("--table", action="store_true", help="print a Markdown table too")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    by_server: dict[str, list[dict]] = {}
    for path in args.results:
        for row in load(path):
            by_server.setdefault(row["server"], []).append(row)
    for label, rows in by_server.items():
        finite = [float(r["request_rate"]) for r in rows if r["request_rate"] != "inf"]
        top = max(finite, default=1.0) * 1.5
        x = [float(r["request_rate"]) if r["request_rate"] != "inf" else top for r in rows]
        for ax, key, name in zip(axes, ("output_throughput", "mean_ttft_ms", "mean_tpot_ms"),
                                 ("output tokens/s", "mean TTFT (ms)", "mean TPOT (ms)")):
            ax.plot(x, [r[key] for r in rows], "o-", label=DISPLAY.get(label, label))
            ax.set(xlabel="request rate (req/s; rightmost: all at once)", ylabel=name)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    if args.table:
        print(table(by_server))
    return 0


# (key, higher is better, decimals) of the table's figures
COLUMNS = [("output_throughput", True, 1), ("mean_ttft_ms", False, 0), ("p99_ttft_ms", False, 0),
           ("mean_tpot_ms", False, 0), ("p99_tpot_ms", False, 0), ("p99_itl_ms", False, 0)]


DISPLAY = {"vllm": "vLLM"}


def table(by_server: dict[str, list[dict]]) -> str:
    lines = ["| rate (req/s) | server | out tok/s | TTFT mean / p99 (ms) | TPOT mean / p99 (ms) | ITL p99 (ms) |",
             "|---|---|---:|---:|---:|---:|"]
    rates = list(dict.fromkeys(r["request_rate"] for rows in by_server.values() for r in rows))
    for rate in rates:
        rows = {name: next(r for r in rs if r["request_rate"] == rate)
                for name, rs in by_server.items() if any(r["request_rate"] == rate for r in rs)}
        best = {key: (max if high else min)(r[key] for r in rows.values()) for key, high, _ in COLUMNS}
        for name, r in rows.items():
            cells = []
            for key, _, decimals in COLUMNS:
                text = f"{r[key]:,.{decimals}f}"
                cells.append(f"**{text}**" if len(rows) > 1 and r[key] == best[key] else text)
            label = "all at once" if rate == "inf" else rate
            lines.append(f"| {label} | {DISPLAY.get(name, name)} | {cells[0]} | {cells[1]} / {cells[2]} | "
                         f"{cells[3]} / {cells[4]} | {cells[5]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
