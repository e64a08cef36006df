"""examples/train_and_sample.py runs end to end on a tiny random Llama with a real chat
template (`tiny_text_model`): two AdamW steps through `causal_forward`, each followed by
`update_weights` and a greedy sample; the loss falls."""
from __future__ import annotations

import importlib.util
import pathlib
import re

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_and_sample.py"


def test_train_and_sample_example(tiny_text_model, capsys):
    spec = importlib.util.spec_from_file_location("train_and_sample", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--model", tiny_text_model, "--steps", "2", "--lr", "1e-2", "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert "step 0  (before training)" in out
    losses = [float(x) for x in re.findall(r"^step \d+  loss +([\d.]+)", out, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0], out
