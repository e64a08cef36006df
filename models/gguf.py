"""GGUF files (llama.cpp's format): header, config, tensors and tokenizer.

A GGUF file is: magic "GGUF", u32 version, u64 tensor count, u64 key/value count, the
key/value metadata, the tensor descriptors (name, dims, ggml type, offset), padding to
`general.alignment`, then the tensor data. We parse the header ourselves (gguf's
GGUFReader builds numpy views for every token string and takes seconds on a 49k-token
vocabulary) and hand the raw tensor bytes to gguf.quants.dequantize.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import os
import pathlib
import struct
import warnings
from typing import Any

import numpy as np

from .config import ModelConfig

# `general.architecture` values we read (llama.cpp stores Mistral models as "llama").
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")

GGUF_MAGIC = b"GGUF"
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                    10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                  10: "<u8", 11: "<i8", 12: "<f8"}


@dataclasses.dataclass(frozen=True)
class _GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dims fastest-first)
    qtype: int              # gguf.GGMLQuantizationType value
    offset: int             # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class _GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, _GGUFTensor]


class _GGUFParser:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, vtype: int):
        fmt = _GGUF_SCALAR_FMT[vtype]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + n
        if self.pos > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header")
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            (etype, count) = struct.unpack_from("<IQ", self.buf, self.pos)
            self.pos += 12
            if etype in _GGUF_NP_DTYPE:
                dt = np.dtype(_GGUF_NP_DTYPE[etype])
                arr = np.frombuffer(self.buf, dt, count, self.pos).copy()
                self.pos += dt.itemsize * count
                return arr
            if etype == _GGUF_STRING:
                return [self.string() for _ in range(count)]
            if etype == _GGUF_ARRAY:
                return [self.value(_GGUF_ARRAY) for _ in range(count)]
            raise ValueError(f"{self.path}: unknown GGUF array element type {etype}")
        if vtype in _GGUF_SCALAR_FMT:
            return self.scalar(vtype)
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")


def _parse_header(path: pathlib.Path) -> _GGUFHeader:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: too short to be a GGUF file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if mm[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        p = _GGUFParser(mm, path)
        p.pos = 4
        version = p.scalar(4)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian files are "
                             "not supported)")
        n_tensors, n_kv = p.scalar(10), p.scalar(10)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = p.string()
            metadata[key] = p.value(p.scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = p.string()
            n_dims = p.scalar(4)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, p.pos)
            p.pos += 8 * n_dims
            qtype, offset = p.scalar(4), p.scalar(10)
            infos.append((name, tuple(reversed(dims)), qtype, offset))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-p.pos // align) * align
    finally:
        mm.close()

    tensors = {}
    for name, shape, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {qtype}") from None
        n = math.prod(shape)
        if shape and shape[-1] % block:
            raise ValueError(f"{path}: tensor {name!r} row length {shape[-1]} is not a multiple "
                             f"of its block size {block}")
        t = _GGUFTensor(name, shape, qtype, data_start + offset, n // block * type_size)
        if t.offset + t.nbytes > size:
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = t
    return _GGUFHeader(version, metadata, tensors)


@functools.lru_cache(maxsize=4)
def _header_cached(path: str, size: int, mtime_ns: int) -> _GGUFHeader:
    return _parse_header(pathlib.Path(path))


def gguf_header(path: pathlib.Path) -> _GGUFHeader:
    st = path.stat()
    return _header_cached(str(path), st.st_size, st.st_mtime_ns)


def gguf_arch(header: _GGUFHeader, path) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; jpaged reads "
                         f"{', '.join(SUPPORTED_GGUF_ARCHS)} (Mistral GGUFs are stored as llama)")
    return arch


def gguf_to_hf_config(header: _GGUFHeader, path) -> dict[str, Any]:
    """Translates GGUF metadata into a transformers-style config dict."""
    meta, tensors = header.metadata, header.tensors
    arch = gguf_arch(header, path)

    def need(key):
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks {full!r}")
        return _scalar(meta[full], full, path)

    def opt(key, default=None):
        full = f"{arch}.{key}"
        return _scalar(meta[full], full, path) if full in meta else default

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = opt("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = opt("rope.dimension_count")  # as transformers reads llama GGUFs
    if head_dim is None:
        head_dim = hidden // heads
    vocab = opt("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else tensors["token_embd.weight"].shape[0]

    model_type = arch
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type = "mistral"  # what transformers makes of llama.cpp's Mistral files

    d: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(opt("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(opt("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(opt("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": _opt_int(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(meta.get("tokenizer.ggml.eos_token_id")),
    }
    scaling = opt("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{path}: unsupported GGUF rope scaling {scaling!r}")
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    return d


def _scalar(v, key, path):
    if isinstance(v, (np.ndarray, list)):
        values = set(np.asarray(v).tolist())
        if len(values) != 1:
            raise ValueError(f"{path}: GGUF field {key!r} varies per layer ({v}); not supported")
        return values.pop()
    return v


def _opt_int(v):
    return None if v is None else int(v)


# HF name inside a layer -> GGUF name inside `blk.N.`
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# llama.cpp's rope frequency table for Llama 3 style scaling; not representable here.
_GGUF_ROPE_FREQS = "rope_freqs.weight"


def rope_unpermute_index(rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns a llama.cpp q/k projection back into Hugging Face's.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout
    (first half of the rotary pairs, then the second half) to interleaved pairs:
    HF row ``s*half + j`` of a head is stored at GGUF row ``2*j + s``. Indexing the
    GGUF rows with the returned array restores HF's order.
    """
    head_dim = rows // n_heads
    half = head_dim // 2
    h = np.arange(n_heads)[:, None, None]
    s = np.arange(2)[None, :, None]
    j = np.arange(half)[None, None, :]
    return (h * head_dim + 2 * j + s).reshape(-1)


class GGUFSource:
    """GGUF tensors under Hugging Face names, dequantized to float32 (loader's `_Source`)."""

    def __init__(self, path: pathlib.Path, config: ModelConfig):
        self.path = path
        self.header = gguf_header(path)
        arch = gguf_arch(self.header, path)
        global_names = {g: h for h, g in _GGUF_GLOBAL_NAMES.items()}
        layer_names = {g: h for h, g in _GGUF_LAYER_NAMES.items()}
        self._to_gguf: dict[str, str] = {}
        for gname in self.header.tensors:
            if gname == _GGUF_ROPE_FREQS:
                warnings.warn(f"{path.name} carries {_GGUF_ROPE_FREQS} (Llama 3 style rope "
                              "scaling), which jpaged ignores, as transformers does; long-context "
                              "outputs will differ from the original model", stacklevel=3)
                continue
            hf = global_names.get(gname)
            parts = gname.split(".", 2)
            if parts[0] == "blk" and len(parts) == 3 and parts[2] in layer_names:
                hf = f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
            self._to_gguf[hf or gname] = gname
        self.names = set(self._to_gguf)
        # llama.cpp permutes q/k rows of "llama" models (not qwen2) for its rope kernel.
        self._unpermute: dict[str, np.ndarray] = {}
        if arch == "llama":
            q_rows = config.num_heads * config.head_dim
            kv_rows = config.num_kv_heads * config.head_dim
            q_idx = rope_unpermute_index(q_rows, config.num_heads)
            k_idx = rope_unpermute_index(kv_rows, config.num_kv_heads)
            for name in self.names:
                if ".self_attn.q_proj." in name:
                    self._unpermute[name] = q_idx
                elif ".self_attn.k_proj." in name:
                    self._unpermute[name] = k_idx
        self._data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)

    def shape(self, name):
        return self.header.tensors[self._to_gguf[name]].shape

    def describe(self, name):
        return f"{self._to_gguf.get(name, name)!r} (as {name!r})"

    def get(self, name, rows=None):
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.header.tensors[self._to_gguf[name]]
        raw = self._data[t.offset:t.offset + t.nbytes]
        n_rows = math.prod(t.shape[:-1])
        raw = raw.reshape(*t.shape[:-1], t.nbytes // n_rows)
        if rows is not None:
            raw = raw[rows[0]:rows[1]]
        w = dequantize(raw, GGMLQuantizationType(t.qtype))
        idx = self._unpermute.get(name)
        if idx is not None:
            assert rows is None
            w = w[idx]
        return w

    def close(self):
        self._data = None


def build_gguf_tokenizer(path: pathlib.Path):
    """transformers' own GGUF tokenizer builders, fed the metadata jpaged's GGUF parser read.

    `AutoTokenizer.from_pretrained(..., gguf_file=...)` would do the same but reads the file
    through a module that imports torch; going around it keeps torch out of the runtime
    dependencies. tests/test_loader.py checks the two give the same tokenizer."""
    from tqdm.auto import tqdm
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # an older transformers layout: its own GGUF path (which needs torch)
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    with tqdm(total=1, desc=f"Converting tokenizer of {path.name} (once; cached after)",
              unit="file", leave=False) as bar:
        header = gguf_header(path)
        meta = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in header.metadata.items()}
        groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                          if f"tokenizer.{key}" in meta}
                  for group, renames in GGUF_TOKENIZER_MAPPING.items()}
        tokenizer_dict, config = groups["tokenizer"], groups["tokenizer_config"]
        if "tokens" not in tokenizer_dict:
            raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
        if tokenizer_dict.get("tokenizer_type") == "llama":
            config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece files
        tokens = tokenizer_dict["tokens"]
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            token_id = meta.get(f"tokenizer.ggml.{key}")
            config[name] = tokens[token_id] if token_id is not None else None
        backend, extra = convert_gguf_tokenizer(gguf_arch(header, path), tokenizer_dict)
        tok = TokenizersBackend(tokenizer_object=backend, **config, **extra)
        bar.update()
    return tok
