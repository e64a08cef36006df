"""Ragged (prefill / mixed) PagedAttention kernel (interpret mode) vs its jnp
reference, and the reference vs naive dense NumPy attention."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from jpaged.pallas_kernels import (
    paged_attention,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from kernel_cases import (BF16, assert_close, check_kernel, dense_attention_numpy, layout_case,
                          sweep, sweep_case)

# Every context length of the issue (kernel_cases.CONTEXTS) with a mix of query lengths:
# whole-prompt prefill (query = context), chunked prefill / prefix-cache hits (query <
# context), a decode token, and an empty padding sequence; plus padding tokens after the
# last sequence.
QUERIES = [1, 15, 5, 17, 40, 1, 32, 0]
PAD_TOKENS = 3


# With kernel_cases.SHARED_DEFAULT, and the ragged kernel's own tunables.
@sweep([(32, 2, 1, 128, jnp.float16, {}),
        (16, 1, 1, 64, BF16, dict(block_q=16, pages_per_compute_block=2))])
def test_kernel_matches_reference(bs, kvh, group, d, dtype, tun):
    # Padding tokens -> exactly zero.
    check_kernel(ragged_paged_attention, ragged_paged_attention_reference, bs, kvh, group, d,
                 dtype, tun, queries=QUERIES, pad_tokens=PAD_TOKENS, pad_rows=PAD_TOKENS)


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_reference_matches_dense_numpy(dtype):
    c = sweep_case(5, 16, 2, 3, 64, dtype, queries=QUERIES, pad_tokens=PAD_TOKENS)
    ref = ragged_paged_attention_reference(**c)
    assert_close(ref, dense_attention_numpy(**c), dtype, "reference")


@st.composite
def _layouts(draw, num_seqs=4, max_ctx=64, num_tokens=48):
    ctx = draw(st.lists(st.integers(0, max_ctx), min_size=num_seqs, max_size=num_seqs))
    qlen = [draw(st.integers(0, c)) for c in ctx]
    while sum(qlen) > num_tokens:  # keep the packed batch within its bucket
        i = int(np.argmax(qlen))
        qlen[i] //= 2
    return ctx, qlen, num_tokens - sum(qlen)


# Fixed shapes (one compile), random runtime data: query/context lengths,
# empty sequences anywhere, q blocks that start mid-sequence, sharing.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), layout=_layouts(), share=st.booleans())
def test_kernel_random_layouts(seed, layout, share):
    ctx, qlen, pad = layout
    c = layout_case(seed, ctx, share, num_blocks=40, queries=qlen, pad_tokens=pad)
    out = ragged_paged_attention(**c, interpret=True, block_q=8, pages_per_compute_block=2)
    assert_close(out, dense_attention_numpy(**c), jnp.float32, "random")


def test_one_token_per_sequence_equals_decode():
    ctx = [3, 40, 0, 17]
    c = sweep_case(
        9, 8, 2, 4, 64, jnp.float32, contexts=ctx, queries=[1, 1, 0, 1], pad_tokens=PAD_TOKENS
    )
    ragged = ragged_paged_attention(**c, interpret=True)
    qsl = np.asarray(c["query_start_loc"])
    real = [b for b in range(len(ctx)) if qsl[b + 1] > qsl[b]]
    dec = {k: v for k, v in c.items() if k != "query_start_loc"}
    dec["q"] = (
        jnp.zeros((len(ctx),) + c["q"].shape[1:], c["q"].dtype)
        .at[np.asarray(real)]
        .set(c["q"][qsl[np.asarray(real)]])
    )
    decode = paged_attention(**dec, interpret=True)
    for b in real:
        assert_close(ragged[qsl[b]], decode[b], jnp.float32, f"seq {b}")
