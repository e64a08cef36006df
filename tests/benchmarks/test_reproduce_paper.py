"""`scripts/reproduce_paper.py --quick` on the tiny model: every figure's data and PNG (the
whole run behind -m slow; figs 14 and 18a by default), the budget holding the paper's
ratio, a resumed run measuring nothing again; and the online replay's sustained-rate
interpolation."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from jpaged.benchmarks import online, paper

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_sustained_rate_interpolates_the_bound():
    pts = [{"request_rate": r, "normalized_latency_mean_s": lat} for r, lat in
           [(1.0, 0.1), (2.0, 0.2), (3.0, 1.0), (math.inf, 5.0)]]
    assert online.sustained_rate(pts, 0.6) == pytest.approx(2.5)
    assert online.sustained_rate(pts, 0.05) == 0.0
    assert online.sustained_rate(pts, 2.0) == 3.0


def test_budget_keeps_the_papers_ratio_of_pool_to_mean_request():
    from helpers import TINY_SHAPE
    workload = [{"prompt_token_ids": [1] * 100, "max_tokens": 200}] * 3
    b = paper.budget(workload, "sharegpt", TINY_SHAPE)
    assert b["pool_to_request_ratio"] == pytest.approx(14648 / 499)
    assert b["pool_tokens"] == int(14648 / 499 * 300)
    assert b["kv_cache_memory"] == b["pool_tokens"] * 2 * 3 * 2 * 16 * 4  # K+V, 3 layers, 2 heads of 16, f32


def check_fig14(res) -> None:
    assert {(r["mode"], r["enable_block_sharing"]) for r in res["fig14"]} == {
        (m, s) for m in ("parallel", "beam") for s in (True, False)}
    unshared = {r["mode"]: r["blocks_copied"] for r in res["fig14"] if not r["enable_block_sharing"]}
    shared = {r["mode"]: r["blocks_copied"] for r in res["fig14"] if r["enable_block_sharing"]}
    assert unshared["parallel"] > shared["parallel"]  # without sharing a fork copies every block


def run_quick(model: str, tmp_path, figures: str):
    """scripts/reproduce_paper.py --quick for `figures`: (its out folder, the command,
    results.json)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "points"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce_paper.py"), "--quick", "--model",
           model, "--out", str(out), "--only", figures]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return out, cmd, json.loads((out / "results.json").read_text())


def test_reproduce_paper_quick_fig14_and_fig18a(tiny_text_model, tmp_path):
    """The two cheap figures (about 30 s), and a resumed run measuring nothing again; the
    whole --quick run (about 9 minutes on 2 cores) is behind -m slow."""
    out, cmd, res = run_quick(tiny_text_model, tmp_path, "fig14,fig18a")
    check_fig14(res)
    assert res["fig18a"]["points"]
    assert (out / "fig14_sharing.png").stat().st_size > 5000
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json"}
    assert before
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json"} == before


@pytest.mark.slow
def test_reproduce_paper_quick(tiny_text_model, tmp_path):
    out, cmd, res = run_quick(tiny_text_model, tmp_path, "fig2,fig12,fig14,fig18a,fig18b,fig19")
    assert set(res["fig2"]) == set(paper.POLICIES)
    for policy, shares in res["fig2"].items():
        assert sum(shares.values()) == pytest.approx(1.0), policy
    # the reserving policies hold at least the slots paged does for the same tokens
    assert res["fig2"]["orca-max"]["internal_fragmentation"] > res["fig2"]["paged"]["internal_fragmentation"]
    for kind in ("sharegpt", "alpaca"):
        fig = res["fig12"][kind]
        assert fig["capacity_requests_per_s"] > 0 and fig["latency_bound_s"] > 0
        for policy in paper.POLICIES:
            curve = fig["curves"][policy]
            assert [c["requests"] for c in curve] == [res["workloads"][kind]["requests"]] * 2
            assert all(c["normalized_latency_mean_s"] > 0 and c["mean_batch_size"] >= 1 for c in curve)
            assert all(c["compilations"] == 0 and c["kv_policy"] == policy for c in curve)
            assert fig["sustained_rate"][policy] >= 0
            assert isinstance(fig["sustained_at_top"][policy], bool)
            assert fig["offline_ratio_to_paged"][policy] == pytest.approx(
                fig["offline"]["paged"]["output_tokens_per_s"] / fig["offline"][policy]["output_tokens_per_s"])
        assert res["budgets"][kind]["pool_to_request_ratio"] == pytest.approx(
            paper.PAPER_POOL_TOKENS / paper.PAPER_MEAN_REQUEST_TOKENS[kind])
    check_fig14(res)
    assert [c["block_size"] for c in res["fig18b"]["sharegpt"]] == [16, 32]
    assert res["fig18a"]["points"]
    micro = res["fig19"]["micro"][0]
    assert micro["swap_s"] > 0 and micro["recompute_s"] > 0
    assert {c["preemption_mode"] for m in res["fig19"]["end_to_end"].values() for c in m} == {"recompute", "swap"}
    for png in ("fig2_memory_breakdown", "fig12_latency_vs_rate", "fig14_sharing",
                "fig18_kernel_block_size", "fig19_swap_recompute"):
        assert (out / f"{png}.png").stat().st_size > 5000, png
    # resumed: every point is on disk, so nothing is measured again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json"}
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json"} == before
    # --fractions '': the offline points alone (on disk already), no rate sweep and no fig12 plot
    figures = tmp_path / "offline"
    subprocess.run(cmd[:-2] + ["--only", "fig2,fig12", "--fractions", "", "--figures", str(figures)],
                   check=True, capture_output=True, text=True, timeout=300)
    offline = json.loads((figures / "results.json").read_text())
    assert all(not curve for r in offline["fig12"].values() for curve in r["curves"].values())
    assert "sustained_rate" not in offline["fig12"]["sharegpt"] and offline["fig2"] == res["fig2"]
    assert (figures / "fig2_memory_breakdown.png").exists() and not (figures / "fig12_latency_vs_rate.png").exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json"} == before
