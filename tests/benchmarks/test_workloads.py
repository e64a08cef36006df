"""The benchmark workloads ship with the package: every shipped file is what the generator
makes (so they can be remade), a shipped name or a path loads, and bad files say why."""
from __future__ import annotations

import json

import pytest

from jpaged.benchmarks import workloads


def test_shipped_workloads_are_the_generator_output():
    for name, (shape, n) in workloads.SHIPPED.items():
        shipped = json.loads((workloads.DATA / f"{name}.json").read_text())
        assert shipped == workloads.make_workload(shape, n, seed=0), name
        assert workloads.load_workload(name) == shipped


def test_generator_command_writes_a_workload(tmp_path, capsys):
    out = tmp_path / "w.json"
    assert workloads.main(["alpaca", "5", "3", str(out)]) == 0
    assert json.loads(out.read_text()) == workloads.make_workload("alpaca", 5, 3)
    assert "5 requests" in capsys.readouterr().out


def test_load_workload_paths_and_errors(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps([{"prompt_token_ids": [1, 2], "max_tokens": 3}] * 4))
    assert len(workloads.load_workload(path, num_requests=2)) == 2
    with pytest.raises(FileNotFoundError, match="neither a shipped workload"):
        workloads.load_workload("no_such_workload")
    path.write_text(json.dumps([{"prompt_token_ids": [], "max_tokens": 3}]))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        workloads.load_workload(path)
    path.write_text(json.dumps([{"prompt_token_ids": [1], "max_tokens": 0}]))
    with pytest.raises(ValueError, match="max_tokens"):
        workloads.load_workload(path)


def test_vary_keeps_lengths_and_changes_every_token():
    ids = [0, 1, 5, 100, 49151]
    moved = workloads.vary(ids, 2)
    assert len(moved) == len(ids) and all(a != b for a, b in zip(ids, moved))
    assert all(t >= 0 for t in moved)
