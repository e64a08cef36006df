"""Converted checkpoints (`jpaged convert`, `jpaged.runner.checkpoint`): the original model's
params on 1 device and, on 4 CPU devices (a subprocess: the device count is fixed when jax
starts), at 2 and 4 (KV heads repeated), restored straight into the shards: each device is
sent only the slices it reads; transformers' greedy tokens at 4 devices. Behind -m slow: the
default model's GGUF tokens from its converted folder at 1 and 3 devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jpaged.cli.main import main as cli
from jpaged.models import loader
from jpaged.runner.model_loader import load_model

TESTS = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (HF folder, its converted folder, the transformers model), built once each:
    llama (lm_head untied), qwen2 (qkv biases; 4 heads, 2 KV heads)."""
    from helpers import build_tiny_hf
    root, built = tmp_path_factory.mktemp("ckpt"), {}

    def get(kind):
        if kind not in built:
            model = build_tiny_hf(kind, root / kind)
            assert cli(["convert", str(root / kind), str(root / f"{kind}-converted")]) == 0
            built[kind] = (root / kind, root / f"{kind}-converted", model)
        return built[kind]
    return get


def assert_same_params(a, b):
    (la, ta), (lb, tb) = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.sharding.is_equivalent_to(y.sharding, x.ndim), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_a_converted_folder_loads_the_same_params_on_one_device(tiny, kind):
    src, out, _ = tiny(kind)
    assert loader.is_converted(out) and not loader.is_converted(src)
    assert loader.load_config(out) == loader.load_config(src)
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert not list(out.glob("*.safetensors"))
    for scan in (False, True):
        kw = dict(tokenizer=object(), pack_weights=False, scan_layers=scan)
        assert_same_params(load_model(str(out), **kw).params, load_model(str(src), **kw).params)
    bf16 = load_model(str(out), tokenizer=object(), dtype="bfloat16", pack_weights=False)
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {np.dtype("bfloat16")}  # cast on read


def test_convert_refuses_a_used_folder_and_the_host_loader_names_the_format(tiny, tmp_path, capsys):
    src, out, _ = tiny("qwen2")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert cli(["convert", str(src), str(tmp_path / "used")]) == 1
    assert "is not an empty folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "used") == ["keep.txt"]
    with pytest.raises(ValueError, match="written by `jpaged convert`"):
        loader.load_params(out, loader.load_config(out))


WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import jpaged
    from helpers import NoTokenizer
    from jpaged.models import loader
    from jpaged.runner import checkpoint
    from jpaged.runner.model_loader import load_model

    put_bytes = {{}}  # device id -> bytes of the host arrays jax.device_put sent it
    real_put = jax.device_put
    def recording_put(x, device=None, *args, **kwargs):
        targets = device if isinstance(device, (list, tuple, dict)) else [device] * len(jax.tree.leaves(x))
        for leaf, target in zip(jax.tree.leaves(x), jax.tree.leaves(targets, is_leaf=lambda t: t is None)):
            target = getattr(target, "sharding", target)  # a Format (orbax's)
            for d in ([jax.devices()[0]] if target is None else target.device_set):
                put_bytes[d.id] = put_bytes.get(d.id, 0) + np.asarray(leaf).nbytes
        return real_put(x, device, *args, **kwargs)
    jax.device_put = recording_put

    def shard_bytes(tree, mesh_size):  # device id -> bytes of its shards of `tree`'s arrays
        out = dict.fromkeys(range(mesh_size), 0)
        for x in jax.tree.leaves(tree):
            for d, index in x.sharding.devices_indices_map(x.shape).items():
                out[d.id] += np.zeros(x.shape, np.int8)[index].size * np.dtype(x.dtype).itemsize
        return out

    src, out = {src!r}, {out!r}
    config = loader.load_config(out)
    layer = checkpoint.layer_shapes(config, checkpoint.mlp_units(config))
    kv_bytes = config.num_layers * sum(4 * int(np.prod(layer[n])) for n in checkpoint.KV_NAMES if n in layer)
    results = dict(kv_bytes=kv_bytes)
    for tp in (2, 4):
        loaded = {{}}
        for name, path in (("hf", src), ("converted", out)):
            put_bytes.clear()
            loaded[name] = load_model(path, tokenizer=NoTokenizer(), tensor_parallel_size=tp,
                                      scan_layers=tp == 4)
            results[f"{{name}}-{{tp}}"] = dict(put=put_bytes.copy(), held=shard_bytes(loaded[name].params, tp))
        same = jax.tree.map(lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim)
                            and bool((np.asarray(a) == np.asarray(b)).all()),
                            loaded["hf"].params, loaded["converted"].params)
        results[f"same-{{tp}}"] = all(jax.tree.leaves(same))
        del loaded
    greedy = jpaged.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = {prompts!r}
    llm = jpaged.LLM(out, tokenizer=NoTokenizer(), tensor_parallel_size=4, max_num_seqs=2,
                     max_model_len=64, kv_cache_memory=1 << 20, compilation_cache_dir="")
    results["tokens"] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    print("RESULTS" + json.dumps(results))
""")


def run_worker(code: str, devices: int, cwd) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    # run from cwd (a tmp folder): from the checkout's root, `import jpaged` would find its
    # source tree, which lacks the installed jpaged.models
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def test_two_and_four_devices_restore_straight_into_their_shards(tiny, tmp_path):
    """qwen2: at 4 devices each KV head is repeated, read whole by every device, which takes
    its own. The HF path hands jax.device_put whole arrays (which it then splits): the
    recorder sees them there, so it would see them in the converted path too. Greedy tokens
    at 4 devices: transformers' own."""
    from helpers import hf_greedy
    src, out, model = tiny("qwen2")
    prompts = [[1, 44, 45, 46], [1] + list(range(100, 120))]
    r = run_worker(WORKER.format(tests=TESTS, src=str(src), out=str(out), prompts=prompts), 4, tmp_path)
    for tp in (2, 4):
        assert r[f"same-{tp}"], tp  # equal values, equal shardings
        hf, converted = r[f"hf-{tp}"], r[f"converted-{tp}"]
        whole = sum(hf["put"].values()) // tp  # the HF path hands every device every whole array
        assert all(put == whole > int(hf["held"][d]) for d, put in hf["put"].items()), hf
        # each device was sent what it holds; at 4 devices, where each KV head is repeated, also
        # the whole (small) k and v, of which it keeps its head
        for d, put in converted["put"].items():
            held = converted["held"][d]
            assert put == held if tp == 2 else held < put <= held + r["kv_bytes"], (tp, d, put, held)
    assert r["tokens"] == [hf_greedy(model, p, 8) for p in prompts]


DEFAULT_MODEL_WORKER = textwrap.dedent("""
    import json
    import jpaged
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three primes."]
    greedy = jpaged.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = {{}}
    for name, path, tp in (("gguf", None, 1), ("converted", {out!r}, 1), ("converted", {out!r}, 3)):
        llm = jpaged.LLM(path, tensor_parallel_size=tp, max_num_seqs=4, max_model_len=1024,
                         kv_cache_memory=256 << 20, compilation_cache_dir="")
        tokens[f"{{name}}-{{tp}}"] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        del llm
    print("RESULTS" + json.dumps(tokens))
""")


@pytest.mark.slow
def test_the_default_model_converted_gives_the_gguf_tokens_on_1_and_3_devices(tmp_path):
    out = tmp_path / "smollm2"
    assert cli(["convert", str(out)]) == 0
    tokens = run_worker(DEFAULT_MODEL_WORKER.format(out=str(out)), 3, tmp_path)
    assert tokens["converted-1"] == tokens["gguf-1"] == tokens["converted-3"]
    assert all(len(t) == 32 for t in tokens["gguf-1"])
