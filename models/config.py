"""Architecture description shared by every supported model (the Llama family and OPT).

One frozen dataclass read from a Hugging Face `config.json` (or a GGUF header);
the Flax model and the KV pool are sized from it.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    # or ("linear", factor) or None; a tuple so the config stays hashable (a jit static arg).
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias; OPT: every projection
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # OPT only: LayerNorm before each block (False: after it, OPT-350M, which then has no final
    # norm); the token embeddings' width where it differs from hidden_size (project_in/out).
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.word_embed_proj_dim is not None and self.word_embed_proj_dim <= 0:
            raise ValueError(f"ModelConfig.word_embed_proj_dim must be > 0 or None, "
                             f"got {self.word_embed_proj_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Reads a transformers `config.json` (or `PretrainedConfig.to_dict()`)."""
        if d.get("model_type") == "opt":
            return cls._from_opt_dict(d)
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        # transformers >= 5 moves rope_theta/rope_scaling into `rope_parameters`.
        rope = dict(d.get("rope_scaling") or {})
        rope.update(d.get("rope_parameters") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "llama3":
            scaling = ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                       float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        elif kind == "linear":
            scaling = ("linear", float(rope["factor"]))
        elif kind in ("default", None):
            scaling = None
        else:
            raise ValueError(f"unsupported rope scaling type {kind!r}")
        model_type = d.get("model_type", "llama")
        sliding = d.get("sliding_window") if d.get("use_sliding_window", model_type == "mistral") else None
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_eos_ids(d),
        )

    @classmethod
    def _from_opt_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """OPT's config.json: MHA, `ffn_dim`, learned positions (no RoPE), biases per
        `enable_bias`, a head tied to the embeddings unless `tie_word_embeddings` is false."""
        hidden, num_heads = d["hidden_size"], d["num_attention_heads"]
        proj = d.get("word_embed_proj_dim") or hidden
        return cls(
            model_type="opt",
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["ffn_dim"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=hidden // num_heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=bool(d.get("enable_bias", True)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_eos_ids(d),
            do_layer_norm_before=bool(d.get("do_layer_norm_before", True)),
            word_embed_proj_dim=proj if proj != hidden else None,
        )


def _eos_ids(d: dict[str, Any]) -> tuple[int, ...]:
    eos = d.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
