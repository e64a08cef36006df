"""The PNGs of `reproduce_paper.py` from its results dict (matplotlib, no display)."""
from __future__ import annotations

import pathlib

COLORS = {"paged": "tab:red", "orca-oracle": "tab:blue", "orca-pow2": "tab:green",
          "orca-max": "tab:purple", "static": "tab:gray"}
SHARES = ("token_states", "reserved", "internal_fragmentation", "external_fragmentation", "free")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fig2(res: dict, path: pathlib.Path) -> None:
    """Shares of the memory in use (the pool less its free part), as the paper draws them."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    policies = list(res)
    used = {p: 1.0 - res[p].get("free", 0.0) for p in policies}
    left = [0.0] * len(policies)
    for name, color in zip(SHARES[:-1], ("tab:green", "tab:olive", "tab:orange", "tab:red")):
        vals = [100 * res[p].get(name, 0.0) / used[p] if used[p] else 0.0 for p in policies]
        ax.barh(policies, vals, left=left, color=color, label=name.replace("_", " "))
        for i, v in enumerate(vals):
            if v >= 5:
                ax.text(left[i] + v / 2, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(policies)), [f"{p}\n({100 * used[p]:.0f}% in use)" for p in policies], fontsize=7)
    ax.set_xlabel("% of the KV memory in use, mean over the steps of a ShareGPT run")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.set_title("KV memory breakdown per allocation policy (paper Fig. 2)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig12(res: dict, path: pathlib.Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, len(res), figsize=(5 * len(res), 6), squeeze=False)
    for col, (kind, r) in enumerate(res.items()):
        for p, curve in r["curves"].items():
            rates = [c["request_rate"] for c in curve]
            at_least = "≥" if r.get("sustained_at_top", {}).get(p) else ""
            axes[0][col].plot(rates, [c["normalized_latency_mean_s"] for c in curve], "o-",
                              color=COLORS.get(p), label=f"{p} ({at_least}{r['sustained_rate'][p]:.2f} req/s)")
            axes[1][col].plot(rates, [c["mean_batch_size"] for c in curve], "o-", color=COLORS.get(p))
        axes[0][col].axhline(r["latency_bound_s"], color="k", lw=0.7, ls=":")
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"{kind}: normalized latency (bound dotted; sustained rate)", fontsize=9)
        axes[0][col].set_ylabel("s / output token")
        axes[0][col].legend(fontsize=7)
        axes[1][col].set_ylabel("mean batch size (sequences)")
        axes[1][col].set_xlabel("request rate (requests/s)")
    fig.suptitle("Normalized latency and batch size against request rate (paper Figs. 12-13)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig14(rows: list, path: pathlib.Path) -> None:
    plt = _plt()
    modes = sorted({r["mode"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        widths = sorted({r["width"] for r in rows if r["mode"] == mode})
        for k, share in enumerate((True, False)):
            vals = [next(r["requests_per_s"] for r in rows if r["mode"] == mode and r["width"] == w
                         and r["enable_block_sharing"] == share) for w in widths]
            ax.bar([i + 0.4 * k for i in range(len(widths))], vals, 0.4,
                   label="sharing" if share else "no sharing")
        ax.set_xticks([i + 0.2 for i in range(len(widths))], [f"{'n' if mode == 'parallel' else 'width'}={w}" for w in widths])
        ax.set_ylabel("requests/s (Alpaca, offline)")
        ax.set_title(f"{mode} {'sampling' if mode == 'parallel' else 'search'}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Block sharing: parallel sampling and beam search throughput (paper Fig. 14)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig18(res18a: dict | None, res18b: dict | None, path: pathlib.Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    if res18a:
        points = [p for p in res18a.get("points", []) if p.get("block_size") == 16]
        for key in sorted({(p["dtype"], p["batch_size"]) for p in points}):
            sel = sorted((p["context_len"], p["paged_over_contiguous"]) for p in points
                         if (p["dtype"], p["batch_size"]) == key)
            axes[0].plot([c for c, _ in sel], [r for _, r in sel], "o-", label=f"{key[0]}, batch {key[1]}")
        axes[0].axhline(1.0, color="k", lw=0.7)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("context length (tokens)")
        axes[0].set_ylabel("paged / contiguous latency")
        axes[0].legend(fontsize=6)
    axes[0].set_title("(a) paged vs contiguous decode attention, this CPU", fontsize=9)
    if res18b:
        for kind, curve in res18b.items():
            axes[1].plot([c["block_size"] for c in curve], [c["normalized_latency_mean_s"] for c in curve],
                         "o-", label=kind)
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("block size (tokens)")
        axes[1].set_ylabel("s / output token")
        axes[1].legend(fontsize=7)
    axes[1].set_title("(b) normalized latency against block size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig19(res: dict, path: pathlib.Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    micro = res["micro"]
    bs = [m["block_size"] for m in micro]
    for key, label in (("swap_out_s", "swap out"), ("swap_in_s", "swap in"), ("swap_s", "swap out + in"),
                       ("recompute_s", "recompute")):
        axes[0].plot(bs, [m[key] * 1e3 for m in micro], "o-", label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("block size (tokens)")
    axes[0].set_ylabel(f"ms for {micro[0]['tokens']} tokens")
    axes[0].legend(fontsize=7)
    axes[0].set_title("(a) overhead of swapping and recomputing", fontsize=9)
    for mode, curve in res["end_to_end"].items():
        axes[1].plot([c["block_size"] for c in curve], [c["normalized_latency_mean_s"] for c in curve],
                     "o-", label=f"{mode} ({sum(c['preemptions'] for c in curve)} preemptions)")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("block size (tokens)")
    axes[1].set_ylabel("s / output token (ShareGPT)")
    axes[1].legend(fontsize=7)
    axes[1].set_title("(b) end-to-end under preemption", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
    """Draw every figure `results` has data for; return the files written."""
    paths = []
    if "fig2" in results:
        fig2(results["fig2"], out / "fig2_memory_breakdown.png")
        paths.append(out / "fig2_memory_breakdown.png")
    if any(r["curves"].get("paged") for r in results.get("fig12", {}).values()):  # not offline points alone
        fig12(results["fig12"], out / "fig12_latency_vs_rate.png")
        paths.append(out / "fig12_latency_vs_rate.png")
    if "fig14" in results:
        fig14(results["fig14"], out / "fig14_sharing.png")
        paths.append(out / "fig14_sharing.png")
    if "fig18a" in results or "fig18b" in results:
        fig18(results.get("fig18a"), results.get("fig18b"), out / "fig18_kernel_block_size.png")
        paths.append(out / "fig18_kernel_block_size.png")
    if "fig19" in results:
        fig19(results["fig19"], out / "fig19_swap_recompute.png")
        paths.append(out / "fig19_swap_recompute.png")
    return paths
