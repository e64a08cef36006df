"""The `jpaged` command line, run in-process on a tiny random model with the default
model's tokenizer: generate, chat with piped stdin, bench throughput (with the
transformers baseline) and every --help."""
from __future__ import annotations

import io
import json
import pathlib
import runpy
import sys

import pytest

from conftest import build_tiny_hf
from jpaged.cli import main, parse_bytes

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--max-num-seqs", "4", "--max-model-len", "128", "--kv-cache-memory", "8000000",
         "--max-num-batched-tokens", "16", "--quiet"]
# Every engine here has the same settings and greedy sampling, so the step shapes the
# first test compiles come from XLA's persistent cache in the others.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_path):
    from jpaged.models.loader import load_tokenizer
    path = tmp_path_factory.mktemp("tiny-cli")
    build_tiny_hf("llama", path, vocab_size=49152)
    load_tokenizer(default_model_path).save_pretrained(path)
    return str(path)


def test_bench_throughput_json(tiny_model, tmp_path, capsys):
    import numpy as np
    rng = np.random.default_rng(0)
    workload = [{"prompt_token_ids": rng.integers(100, 49000, n).tolist(), "max_tokens": m}
                for n, m in [(5, 3), (40, 9), (17, 4), (70, 12), (9, 7), (23, 5)]]
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(workload))
    assert main(["bench", "throughput", "--workload", str(path), "--model", tiny_model, *SMALL,
                 "--json", "--baseline", "hf", "--hf-batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("requests", "prompt_tokens", "output_tokens", "wall_s", "output_tokens_per_s",
                "total_tokens_per_s", "kv_utilization_peak", "kv_utilization_mean",
                "preemptions", "compilations", "load_s", "warmup_s", "dtype", "model",
                "max_num_seqs", "hf_output_tokens_per_s", "speedup_vs_hf"):
        assert key in result, key
    assert result["requests"] == 6
    assert result["prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in workload)
    assert result["output_tokens"] == sum(r["max_tokens"] for r in workload)
    assert result["compilations"] == 0  # the warm-up compiled every shape of the timed run
    assert result["output_tokens_per_s"] == pytest.approx(result["output_tokens"] / result["wall_s"])
    assert result["total_tokens_per_s"] == pytest.approx(
        (result["output_tokens"] + result["prompt_tokens"]) / result["wall_s"])
    assert 0 < result["kv_utilization_mean"] <= result["kv_utilization_peak"] <= 1
    assert result["preemptions"] >= 0 and result["warmup_s"] > 0 and result["load_s"] > 0
    assert result["dtype"] == "float32" and result["max_num_seqs"] == 4
    assert result["speedup_vs_hf"] == pytest.approx(
        result["output_tokens_per_s"] / result["hf_output_tokens_per_s"])


def test_generate_text_and_json(tiny_model, capsys):
    args = ["generate", "--model", tiny_model, *SMALL, "--temperature", "0", "--max-tokens", "6",
            "--ignore-eos", "Hello there", "A longer prompt about paged attention"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("--- prompt") == 2 and "(finish: length)" in text

    assert main([*args, "--json"]) == 0
    outs = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in outs] == args[-2:]
    for out in outs:
        [comp] = out["outputs"]
        assert out["finished"] and comp["finish_reason"] == "length"
        assert len(comp["token_ids"]) == 6 and comp["text"] in text  # greedy: the same text


def test_json_output_keeps_logprobs():
    from jpaged.cli import _output_dict
    from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
    out = RequestOutput("0", "hi", [1, 2], [CompletionOutput(
        0, "x", [7], -0.5, [{7: Logprob(-0.5, 1), 9: Logprob(-1.5, 2)}], "length")], True)
    d = json.loads(json.dumps(_output_dict(out)))
    assert d["outputs"][0]["logprobs"] == [{"7": {"logprob": -0.5, "rank": 1, "decoded_token": None},
                                            "9": {"logprob": -1.5, "rank": 2, "decoded_token": None}}]


def test_chat_streams_and_keeps_history(tiny_model, capsys, monkeypatch):
    import jpaged.llm
    prompts = []
    add_request = jpaged.llm.LLM.add_request

    def recording(self, prompt, params=None, request_id=None):
        prompts.append(list(prompt["prompt_token_ids"]))
        return add_request(self, prompt, params, request_id)

    monkeypatch.setattr(jpaged.llm.LLM, "add_request", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n\nHow are you?\n/exit\nnot read\n"))
    assert main(["chat", "--model", tiny_model, *SMALL, "--temperature", "0",
                 "--max-tokens", "5", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert len(prompts) == 2  # the empty line is skipped, nothing after /exit is read
    assert prompts[1][:len(prompts[0])] == prompts[0]  # the second turn carries the first
    assert len(prompts[1]) > len(prompts[0]) + 5
    assert out.endswith("\n") and out.count("\n") >= 2  # each reply ends its line
    from jpaged.models.loader import load_tokenizer
    history = load_tokenizer(tiny_model).decode(prompts[1][len(prompts[0]):])
    assert out.split("\n")[0].strip() in history  # the streamed first reply is in the history


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"prompt_token_ids": [], "max_tokens": 3}]))
    assert main(["bench", "throughput", "--workload", str(path)]) == 1
    assert "prompt_token_ids" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--temperature", "-1", "hi"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("8000000") == 8_000_000
    assert parse_bytes("8e6") == 8_000_000
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("2 GiB") == 2 << 30
    assert parse_bytes("1.5GB") == 1_500_000_000


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["bench"], ["bench", "throughput"],
                                     ["bench", "memory"], ["serve"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: jpaged {' '.join(command)}".rstrip() in out
    if command in (["generate"], ["chat"], ["bench", "throughput"], ["bench", "memory"], ["serve"]):
        assert "--kv-cache-memory" in out and "--max-num-seqs" in out and "--engine-seed" in out
    if command in (["generate"], ["chat"]):
        assert "--max-tokens" in out and "--top-p" in out and "--stop" in out


def test_script_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark_throughput.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "scripts" / "benchmark_throughput.py"), run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--workload" in out and "--baseline" in out and "Warm-up" in out
