"""Load time of one model stored three ways: GGUF (dequantized on the host), an HF folder
(safetensors), and a `jpaged convert` folder (orbax, read straight into the shards), at
tensor_parallel_size 1 and 3 (CPU devices), from `load_model` to params ready on device.

    python scripts/benchmark_load.py [--sizes default,1b] [--tp 1,3] [--dtype bfloat16]
        [--repeats 2] [--work DIR] [--out /work/bench/i17/load.jsonl]

`default` is the embedded SmolLM2-135M (its GGUF as shipped: Q4_1); `1b` a random Llama of
1.0B params (36 heads, 6 KV heads: it splits over 3) written in all three formats (GGUF in
Q4_1 like the default, the others in --dtype; ~5 GB under --work, deleted after). Each case runs
in a fresh process: run 1 after the model's files are evicted from the page cache
(posix_fadvise), with jax's compilations cold; later runs warm. The tokenizer is not loaded
and weights are not packed (`pack_weights=False`): what differs is the weights' path.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# A ~1B-param Llama that splits over 3 devices: 36 heads, 6 KV heads, MLP 6,144.
BIG = dict(model_type="llama", vocab_size=49152, hidden_size=2304, intermediate_size=6144,
           num_hidden_layers=16, num_attention_heads=36, num_key_value_heads=6, head_dim=64,
           rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def hf_tensors(params: dict, config) -> dict:
    """The loader's tree (models/loader.py) -> Hugging Face names, torch layout."""
    H, KV, hd, F = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    out = {"model.embed_tokens.weight": params["embed_tokens"]["embedding"],
           "model.norm.weight": params["norm"]["scale"]}
    for i in range(config.num_layers):
        layer, p = params[f"layers_{i}"], f"model.layers.{i}."
        qkv, gu = layer["qkv_proj"]["kernel"], layer["gate_up_proj"]["kernel"]
        out.update({p + "input_layernorm.weight": layer["attn_norm"]["scale"],
                    p + "self_attn.q_proj.weight": qkv[:, :H * hd].T,
                    p + "self_attn.k_proj.weight": qkv[:, H * hd:(H + KV) * hd].T,
                    p + "self_attn.v_proj.weight": qkv[:, (H + KV) * hd:].T,
                    p + "self_attn.o_proj.weight": layer["o_proj"]["kernel"].T,
                    p + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
                    p + "mlp.gate_proj.weight": gu[:, :F].T, p + "mlp.up_proj.weight": gu[:, F:].T,
                    p + "mlp.down_proj.weight": layer["down_proj"]["kernel"].T})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def random_tensors(hf: dict, dtype) -> dict:
    """Random weights of an HF config (norms 1), HF names and layout, float32 -> dtype."""
    from jpaged.models import ModelConfig
    from jpaged.models.loader import _expected_tensors
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in _expected_tensors(ModelConfig.from_hf_dict(hf), "model.").items():
        x = np.ones(shape, np.float32) if len(shape) == 1 else \
            rng.standard_normal(shape, np.float32) * 0.02
        out[name] = x.astype(dtype)
    return out


def write_hf(tensors: dict, hf_config: dict, folder: pathlib.Path) -> None:
    from safetensors.numpy import save_file
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"))


def write_gguf(tensors: dict, hf: dict, path: pathlib.Path) -> None:
    """llama.cpp's layout: q/k rows permuted for its rope, matrices Q4_1 (the embedding
    Q8_0), norms F32, as the default model ships."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter
    from gguf.quants import quantize
    from jpaged.models.gguf import _GGUF_GLOBAL_NAMES, _GGUF_LAYER_NAMES, rope_unpermute_index
    w = GGUFWriter(str(path), "llama")
    for key, field in [("block_count", "num_hidden_layers"), ("context_length", "max_position_embeddings"),
                       ("embedding_length", "hidden_size"), ("feed_forward_length", "intermediate_size"),
                       ("attention.head_count", "num_attention_heads"),
                       ("attention.head_count_kv", "num_key_value_heads")]:
        w.add_uint32(f"llama.{key}", hf[field])
    w.add_float32("llama.rope.freq_base", hf["rope_theta"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", hf["rms_norm_eps"])
    for name, x in tensors.items():
        x = x.astype(np.float32)
        heads = {"q_proj": hf["num_attention_heads"], "k_proj": hf["num_key_value_heads"]}.get(
            name.split(".")[-2])
        if heads and "self_attn" in name:  # stored so that the loader's unpermute restores it
            permuted = np.empty_like(x)
            permuted[rope_unpermute_index(x.shape[0], heads)] = x
            x = permuted
        layer = name.split(".", 3)
        gname = _GGUF_GLOBAL_NAMES.get(name) or f"blk.{layer[2]}.{_GGUF_LAYER_NAMES[layer[3]]}"
        qtype = Q.F32 if x.ndim == 1 else Q.Q8_0 if "embed" in name else Q.Q4_1
        if qtype == Q.F32:
            w.add_tensor(gname, x)
        else:
            w.add_tensor(gname, quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def prepare(size: str, dtype: str, work: pathlib.Path) -> dict[str, pathlib.Path]:
    """{format: path} of `size` in GGUF, safetensors and orbax under `work`."""
    from jpaged.models import ModelConfig
    from jpaged.models.gguf import gguf_header, gguf_to_hf_config
    from jpaged.models.loader import default_model_path, load_config, load_params
    from jpaged.runner.checkpoint import convert
    folder = work / size
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"gguf": folder / "model.gguf", "safetensors": folder / "hf", "orbax": folder / "orbax"}
    if size == "default":
        paths["gguf"] = default_model_path()
        hf_config = gguf_to_hf_config(gguf_header(paths["gguf"]), paths["gguf"])
        tensors = hf_tensors(load_params(paths["gguf"], load_config(paths["gguf"]), dtype),
                             ModelConfig.from_hf_dict(hf_config))
    else:
        hf_config, tensors = BIG, random_tensors(BIG, np.dtype(dtype))
        write_gguf(tensors, BIG, paths["gguf"])
    write_hf(tensors, hf_config, paths["safetensors"])
    del tensors
    convert(paths["safetensors"], paths["orbax"], dtype)
    return paths


def evict(path: pathlib.Path) -> None:
    """Drops the files' pages from the page cache (clean pages only: sync first)."""
    os.sync()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_case(path: pathlib.Path, tp: int, dtype: str, repeats: int) -> list[dict]:
    """In a fresh process with >= tp devices: `repeats` loads, the first from a cold cache."""
    import jax
    from jpaged.runner.model_loader import load_model
    runs = []
    for run in range(1, repeats + 1):
        if run == 1:
            evict(path)
        start = time.perf_counter()
        loaded = load_model(str(path), tokenizer=object(), dtype=dtype, tensor_parallel_size=tp,
                            pack_weights=False)
        jax.block_until_ready(loaded.params)
        load_s = time.perf_counter() - start
        leaves = jax.tree.leaves(loaded.params)
        runs.append(dict(run=run, page_cache="evicted" if run == 1 else "warm", load_s=round(load_s, 3),
                         params=int(sum(x.size for x in leaves)),
                         weight_bytes_per_device=int(sum(x.addressable_shards[0].data.nbytes for x in leaves)),
                         peak_rss_bytes=peak_rss_bytes()))
        del loaded, leaves
    return runs


def peak_rss_bytes() -> int:
    """This process's peak resident memory (host arrays and the CPU devices' buffers alike).
    Not getrusage: Linux carries ru_maxrss over from the parent across exec."""
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def disk_bytes(path: pathlib.Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="default,1b")
    p.add_argument("--tp", default="1,3")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=pathlib.Path, default=None, help="default: a temporary folder")
    p.add_argument("--keep", action="store_true", help="keep the written models")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/work/bench/i17/load.jsonl"))
    p.add_argument("--case", type=pathlib.Path, help=argparse.SUPPRESS)  # one case, in this process
    args = p.parse_args(argv)
    if args.case:
        print("RUNS" + json.dumps(run_case(args.case, int(args.tp), args.dtype, args.repeats)))
        return 0
    work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="jpaged-bench-load-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for size in args.sizes.split(","):
            start = time.perf_counter()
            paths = prepare(size, args.dtype, work)
            print(f"{size}: written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            for tp in map(int, args.tp.split(",")):
                for fmt, path in paths.items():
                    env = dict(os.environ, JAX_PLATFORMS="cpu",
                               XLA_FLAGS=f"--xla_force_host_platform_device_count={tp}")
                    proc = subprocess.run([sys.executable, __file__, "--case", str(path), "--tp", str(tp),
                                           "--dtype", args.dtype, "--repeats", str(args.repeats)],
                                          env=env, capture_output=True, text=True)
                    if proc.returncode:
                        raise RuntimeError(f"{size} {fmt} tp={tp} failed:\n{proc.stderr[-3000:]}")
                    line = next(l for l in proc.stdout.splitlines() if l.startswith("RUNS"))
                    with open(args.out, "a") as f:
                        for r in json.loads(line[4:]):
                            row = dict(size=size, format=fmt, tp=tp, dtype=args.dtype,
                                       disk_bytes=disk_bytes(path), **r, cpus=os.cpu_count(),
                                       load_avg_1m=round(os.getloadavg()[0], 2),
                                       host=platform.node(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
                            f.write(json.dumps(row) + "\n")
                            print(json.dumps(row))
            if not args.keep:
                shutil.rmtree(work / size, ignore_errors=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
