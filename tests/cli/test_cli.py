"""The `jpaged` command line, run in-process on a tiny random model with the default
model's tokenizer: generate, chat with piped stdin, bad input, and every --help (flags
generated from the config dataclasses)."""
from __future__ import annotations

import io
import json
import pathlib
import runpy
import sys

import pytest

from helpers import SMALL_ENGINE_FLAGS as SMALL
from jpaged.arg_utils import parse_bytes
from jpaged.cli.main import main

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_generate_text_and_json(tiny_text_model, capsys):
    args = ["generate", "--model", tiny_text_model, *SMALL, "--temperature", "0", "--max-tokens", "6",
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

    # no sampling flags: the model's generation defaults (this folder sets none: greedy)
    assert main([a for a in args if a not in ("--temperature", "0")]) == 0
    assert capsys.readouterr().out == text


def test_json_output_keeps_logprobs():
    from jpaged.cli.generate import output_dict
    from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
    out = RequestOutput("0", "hi", [1, 2], [CompletionOutput(
        0, "x", [7], -0.5, [{7: Logprob(-0.5, 1), 9: Logprob(-1.5, 2)}], "length")], True)
    d = json.loads(json.dumps(output_dict(out)))
    assert d["outputs"][0]["logprobs"] == [{"7": {"logprob": -0.5, "rank": 1, "decoded_token": None},
                                            "9": {"logprob": -1.5, "rank": 2, "decoded_token": None}}]


def test_chat_streams_and_keeps_history(tiny_text_model, capsys, monkeypatch):
    from jpaged.entrypoints.llm import LLM
    prompts = []
    add_request = LLM.add_request

    def recording(self, prompt, params=None, request_id=None, **kw):
        prompts.append(list(prompt["prompt_token_ids"]))
        return add_request(self, prompt, params, request_id, **kw)

    monkeypatch.setattr(LLM, "add_request", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n\nHow are you?\n/exit\nnot read\n"))
    assert main(["chat", "--model", tiny_text_model, *SMALL, "--temperature", "0",
                 "--max-tokens", "5", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert len(prompts) == 2  # the empty line is skipped, nothing after /exit is read
    assert prompts[1][:len(prompts[0])] == prompts[0]  # the second turn carries the first
    assert len(prompts[1]) > len(prompts[0]) + 5
    assert out.endswith("\n") and out.count("\n") >= 2  # each reply ends its line
    from jpaged.models.loader import load_tokenizer
    history = load_tokenizer(tiny_text_model).decode(prompts[1][len(prompts[0]):])
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
        assert "--kv-cache-memory" in out and "--max-num-seqs" in out and "--seed" in out
    if command in (["generate"], ["chat"]):
        assert "--max-tokens" in out and "--top-p" in out and "--stop" in out


def test_script_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark_throughput.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "scripts" / "benchmark_throughput.py"), run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--workload" in out and "--baseline" in out and "Warm-up" in out


def test_every_config_field_is_a_flag_named_after_it(capsys):
    """Engine and server flags are generated from the dataclasses' fields and metadata: a
    new field becomes a flag, its help text and choices come from the field."""
    import dataclasses

    from jpaged.config import EngineConfig
    from jpaged.entrypoints.openai.config import ServerConfig
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for cls in (EngineConfig, ServerConfig):
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            assert flag in out, flag
            assert field.metadata["help"].split(";")[0][:30] in " ".join(out.split()), field.name
    assert "{recompute,swap}" in out and "{auto,cpu,xla,reference,pallas,pallas-interpret}" in out


def test_flags_reach_the_config(monkeypatch):
    """`jpaged serve` hands its flags to the server and the engine by field name (units parsed)."""
    import jpaged.entrypoints.openai.launcher as launcher
    seen = {}
    monkeypatch.setattr(launcher, "serve", lambda model, **kw: seen.update(kw, model=model))
    monkeypatch.setenv("JPAGED_API_KEY", "from-env")
    assert main(["serve", "--port", "0", "--max-n", "3", "--kv-cache-memory", "64MiB",
                 "--no-enable-prefix-caching", "--seed", "7", "--preemption-mode", "swap"]) == 0
    assert seen == {"model": None, "port": 0, "max_n": 3, "api_key": "from-env",
                    "kv_cache_memory": 64 << 20, "enable_prefix_caching": False, "seed": 7,
                    "preemption_mode": "swap"}
