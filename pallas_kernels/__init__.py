"""PagedAttention kernels in Pallas (Triton-lowered on NVIDIA GPUs), their
plain-jnp references, and the K/V write into the paged pool."""

from .kv_write import write_kv, write_kv_reference
from .paged_attention import paged_attention, paged_attention_reference
from .ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from .tuning import decode_params, ragged_params

__all__ = [
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv",
    "write_kv_reference",
    "decode_params",
    "ragged_params",
]
