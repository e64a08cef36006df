"""The xla and cpu backends match the per-token reference on random pools and batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.attention import cpu as cpu_attention
from jpaged.attention.metadata import AttentionMetadata
from jpaged.attention.reference import ReferenceBackend
from jpaged.attention.selector import get_backend
from jpaged.attention.xla import XlaBackend

BACKENDS = ["xla", "cpu"]  # the C++ kernel builds wherever CI runs (g++): no skip


def _case(rng, q_lens, ctx_lens, block_size=4, KV=2, G=3, D=8, num_blocks=64, Q=None, P=None, dtype=np.float32):
    L = 2
    B = len(q_lens)
    k_pool = rng.standard_normal((L, num_blocks, KV, block_size, D)).astype(dtype)
    v_pool = rng.standard_normal((L, num_blocks, KV, block_size, D)).astype(dtype)
    P = P or max(-(-c // block_size) for c in ctx_lens) + 1
    Q = Q or max(q_lens)
    N = sum(q_lens) + 3  # three padding tokens
    perm = rng.permutation(num_blocks)  # shuffled, non-contiguous pages
    tables = np.zeros((B + 1, P), np.int32)  # one padding row
    used = 0
    for b, c in enumerate(ctx_lens):
        n = -(-c // block_size)
        tables[b, :n] = perm[used:used + n]
        used += n
    tables[1, 0] = tables[0, 0] if B > 1 else tables[1, 0]  # share a page between sequences
    qsl = np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)]]).astype(np.int32)
    grid = np.full((B + 1, Q), N, np.int32)
    grid_index = np.zeros(N, np.int32)
    for b, n in enumerate(q_lens):
        grid[b, :n] = np.arange(qsl[b], qsl[b] + n)
        grid_index[qsl[b]:qsl[b] + n] = b * Q + np.arange(n)
    positions = np.zeros(N, np.int32)
    for b, (n, c) in enumerate(zip(q_lens, ctx_lens)):
        positions[qsl[b]:qsl[b] + n] = np.arange(c - n, c)
    meta = AttentionMetadata(jnp.full(N, -1, jnp.int32), jnp.asarray(tables),
                             jnp.asarray(list(ctx_lens) + [0], dtype=jnp.int32), jnp.asarray(qsl),
                             jnp.asarray(grid), jnp.asarray(grid_index),
                             jnp.arange(B + 1, dtype=jnp.int32), jnp.asarray(positions))
    q = rng.standard_normal((N, KV * G, D)).astype(dtype)
    return jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), meta, sum(q_lens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1, 1, 1], [1, 17, 40]),              # decode
    ([5, 1, 12], [5, 9, 30]),              # prefill chunks with cached context, mixed
    ([16], [16]),                          # a whole prompt
    ([3, 7], [3, 7]),
])
def test_backend_matches_reference(backend, q_lens, ctx_lens):
    rng = np.random.default_rng(0)
    q, k, v, meta, n = _case(rng, q_lens, ctx_lens)
    for layer in (0, 1):
        ref = ReferenceBackend().attend(q, k, v, layer, meta, 0.3)
        got = get_backend(backend).attend(q, k, v, layer, meta, 0.3)
        np.testing.assert_allclose(np.asarray(got)[:n], np.asarray(ref)[:n], rtol=2e-5, atol=2e-5)
        assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_pool(backend):
    rng = np.random.default_rng(1)
    q, k, v, meta, n = _case(rng, [1, 4], [33, 9])
    ref = ReferenceBackend().attend(q, k, v, 0, meta, 0.3)
    got = get_backend(backend).attend(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), 0, meta, 0.3)
    np.testing.assert_allclose(np.asarray(got)[:n], np.asarray(ref)[:n], rtol=5e-2, atol=5e-2)


def test_write_drops_padding_slots():
    be = XlaBackend()
    pool = jnp.zeros(be.pool_shape(2, 4, 4, 1, 2))  # 2 layers, 4 blocks of 4, 1 kv head, dim 2
    k = jnp.arange(6, dtype=jnp.float32).reshape(3, 1, 2) + 1
    k_pool, v_pool = be.write(pool, pool, 1, k, k, jnp.asarray([5, -1, 15], jnp.int32))
    v_written = np.argwhere(np.asarray(v_pool)[:, :, 0, :, 0] != 0)  # [layer, block, offset]
    assert v_written.tolist() == [[1, 1, 1], [1, 3, 3]]
    k_view = np.asarray(be.k_view(k_pool))  # [layer, block, kv head, dim, offset]
    assert k_view[1, 1, 0, :, 1].tolist() == [1, 2] and k_view[1, 3, 0, :, 3].tolist() == [5, 6]
    assert np.count_nonzero(k_view) == 4  # the padding token wrote nothing


@pytest.mark.parametrize("new,cached", [
    ([70, 7, 130, 33, 64, 1, 90], [0, 0, 20, 5, 0, 300, 17]),  # 17 tiles: two groups of 16
    ([1, 1, 1, 1, 1, 1, 1, 1, 1], [3, 80, 0, 17, 200, 64, 5, 9, 31]),  # a decode batch
])
@pytest.mark.parametrize("backend,bs,D", [("xla", 4, 8), ("cpu", 16, 32), ("cpu", 2, 32), ("cpu", 128, 32)])
def test_backend_on_input_builder_tiles_matches_reference(backend, bs, D, new, cached):
    """The real input builder's layout (prefill tiles sorted by reach, tile groups, 64 keys
    per iteration over 4-token pages; decode rows) against the per-token reference; the
    kernel on blocks it reads in place and on blocks it gathers."""
    from jpaged.runner.input_builder import InputBuilder
    from jpaged.core.scheduler_output import SchedulerOutput
    from jpaged.core.sequence import Sequence
    rng = np.random.default_rng(3)
    be, KV, G = get_backend(backend), 2, 3
    num_blocks = 4096 // bs  # token slots for every sequence, whatever the block size
    free = list(rng.permutation(num_blocks))
    seqs = []
    for n, c in zip(new, cached):
        seq = Sequence(request=None, token_ids=[1] * (n + c), num_prompt_tokens=n + c)
        seq.num_computed_tokens = c
        seq.block_table = [int(free.pop()) for _ in range(-(-(n + c) // bs))]
        seqs.append(seq)
    batch = SchedulerOutput(seqs, list(new), is_prefill=max(new) > 1)
    inputs = InputBuilder(bs, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=512).build(batch)
    if batch.is_prefill:
        assert inputs.query_grid.shape[0] > 16 and inputs.query_grid.shape[1] == 32
    meta = AttentionMetadata.from_inputs(jax.tree.map(jnp.asarray, inputs))
    shape = be.pool_shape(1, num_blocks, bs, KV, D)
    k_pool = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    v_pool = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q = jnp.asarray(rng.standard_normal((len(inputs.token_ids), KV * G, D)), jnp.float32)
    ref = ReferenceBackend().attend(q, k_pool, v_pool, 0, meta, 0.3)
    got = be.attend(q, k_pool, v_pool, 0, meta, 0.3)
    n = sum(new)
    np.testing.assert_allclose(np.asarray(got)[:n], np.asarray(ref)[:n], rtol=2e-5, atol=2e-5)


def _uses_kernel(be, *args):
    return cpu_attention.TARGET in str(jax.make_jaxpr(be.attend, static_argnums=(3, 5))(*args))


@pytest.mark.parametrize("G,D", [(3, 64), (1, 32), (4, 128), (8, 128), (5, 96), (2, 256), (2, 16)])
@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1] * 9, [1, 16, 17, 40, 200, 15, 33, 64, 65]),  # decode, page boundaries
    ([40, 1, 7, 16], [40, 90, 7, 100]),               # prefill tiles of 8 with cached context
    ([5, 1, 12], [5, 9, 30]),                         # mixed, short
])
def test_cpu_kernel_matches_reference(G, D, q_lens, ctx_lens):
    """The C++ kernel on every head_dim it is built for, GQA groups 1-8, jitted, both
    layers of the pool, float32 and bfloat16 pools; padding tokens get zeros."""
    rng = np.random.default_rng(G * D)
    q, k, v, meta, n = _case(rng, q_lens, ctx_lens, block_size=16, KV=2, G=G, D=D, num_blocks=96)
    _check_kernel(q, k, v, meta, n, float32_layers=(0, 1), bfloat16_layer=1)


def _check_kernel(q, k, v, meta, n, float32_layers, bfloat16_layer):
    """The jitted cpu backend takes the kernel and matches the reference: the pools as given
    in `float32_layers` (padding tokens get zeros), cast to bfloat16 in `bfloat16_layer`."""
    be, scale = get_backend("cpu"), q.shape[-1] ** -0.5
    assert _uses_kernel(be, q, k, v, 0, meta, scale)
    attend = jax.jit(be.attend, static_argnums=(3, 5))
    for layer in float32_layers:
        ref = ReferenceBackend().attend(q, k, v, layer, meta, scale)
        got = np.asarray(attend(q, k, v, layer, meta, scale))
        np.testing.assert_allclose(got[:n], np.asarray(ref)[:n], rtol=2e-5, atol=2e-5)
        assert not got[n:].any()
    kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    ref = ReferenceBackend().attend(q, kb, vb, bfloat16_layer, meta, scale)
    np.testing.assert_allclose(np.asarray(attend(q, kb, vb, bfloat16_layer, meta, scale))[:n],
                               np.asarray(ref)[:n], rtol=1e-4, atol=1e-4)


BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("G,D", [(3, 64), (2, 16), pytest.param(1, 32, marks=pytest.mark.slow),
                                 pytest.param(4, 128, marks=pytest.mark.slow)])
def test_cpu_kernel_block_sizes_match_reference(block_size, G, D):
    """Every power-of-two block size (read in place from 16 tokens up, gathered below): decode
    and prefill rows whose contexts end just before, at and after block and 16-key chunk
    boundaries, float32 and bfloat16 pools, against the per-token reference."""
    rng = np.random.default_rng(block_size * 1000 + G * D)
    bs = block_size
    ctx = sorted({c for c in (1, bs - 1, bs, bs + 1, 2 * bs + 3, 15, 16, 17, 33, 130) if c > 0})
    q_lens = [1] * len(ctx) + [min(c, 11) for c in ctx[-3:]]  # decode rows, then prefill tiles
    ctx_lens = ctx + ctx[-3:]
    num_blocks = sum(-(-c // bs) for c in ctx_lens) + 8
    q, k, v, meta, n = _case(rng, q_lens, ctx_lens, block_size=bs, KV=2, G=G, D=D, num_blocks=num_blocks)
    _check_kernel(q, k, v, meta, n, float32_layers=(1,), bfloat16_layer=0)


def test_cpu_kernel_rejects_other_block_sizes():
    """The kernel itself checks its shapes (the backend never sends it these)."""
    rng = np.random.default_rng(6)
    q, k, v, meta, n = _case(rng, [1], [20], block_size=24, D=64)
    with pytest.raises(Exception, match="power-of-two block_size"):
        cpu_attention.paged_attention(q, k, v, 0, meta.block_tables, meta.context_lens,
                                      meta.query_start_loc, 0.1).block_until_ready()


def test_cpu_backend_other_shapes_take_the_xla_path():
    """head_dim 8 (and blocks of other than a power of two tokens): not the kernel's
    shapes; same pool, the jnp path."""
    assert [b for b in range(300) if cpu_attention.supported(b, 64)] == BLOCK_SIZES
    assert not cpu_attention.supported(16, 8)
    rng = np.random.default_rng(5)
    q, k, v, meta, n = _case(rng, [1, 6], [20, 6], block_size=16, D=8)
    be = get_backend("cpu")
    assert not _uses_kernel(be, q, k, v, 0, meta, 0.1)
    np.testing.assert_allclose(np.asarray(be.attend(q, k, v, 0, meta, 0.1))[:n],
                               np.asarray(ReferenceBackend().attend(q, k, v, 0, meta, 0.1))[:n],
                               rtol=2e-5, atol=2e-5)


def test_cpu_kernel_without_a_compiler(tmp_path, monkeypatch, caplog):
    """No compiler: `cpu` says why; `auto` warns and uses the pure-jnp backend."""
    monkeypatch.setenv("JPAGED_CACHE_DIR", str(tmp_path))  # nothing cached: must compile
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    for f in (cpu_attention.load, cpu_attention.available):
        f.cache_clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    try:
        with pytest.raises(RuntimeError, match="C\\+\\+ kernel.*no-such-compiler"):
            get_backend("cpu")
        with caplog.at_level("WARNING"):
            be = get_backend("auto")
        assert be.name == "xla" and "no-such-compiler" in caplog.text
    finally:
        monkeypatch.undo()
        for f in (cpu_attention.load, cpu_attention.available):
            f.cache_clear()
    assert get_backend("auto").name == "cpu"  # and back, with the real compiler


def test_cpu_kernel_builds_from_source(tmp_path):
    """The build a fresh machine does (CI's cache may already hold the library): compile
    into an empty directory, atomically, and export the FFI handler."""
    import ctypes
    path = tmp_path / "kernel.so"
    cpu_attention.build(path)
    assert path.stat().st_size > 0 and [p.name for p in tmp_path.iterdir()] == ["kernel.so"]
    assert ctypes.cdll.LoadLibrary(str(path)).JpagedPagedAttention  # the symbol jax.ffi registers


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_backend_ignores_stale_slots(backend):
    """Slots past a sequence's context in its last page (and whole pages past it) may hold
    anything a previous owner left, even NaN: weights of zero must not let it through."""
    rng = np.random.default_rng(7)
    q, k, v, meta, n = _case(rng, [1, 3], [20, 35], block_size=16, D=64)
    tables = np.asarray(meta.block_tables)
    k, v = np.array(k), np.array(v)  # writable copies, [L, blocks, KV, bs, D]
    for b, c in enumerate([20, 35]):
        last = tables[b, (c - 1) // 16]
        v[:, last, :, c % 16:] = np.nan  # V rows of the unused slots (K is stored transposed)
        k.reshape(k.shape[:3] + (64, 16))[:, last, :, :, c % 16:] = np.nan
    # Pages a table names past its context (padding entries), when no sequence uses them.
    used = {int(x) for b, c in enumerate([20, 35]) for x in tables[b, :(c + 15) // 16]}
    past = sorted({int(x) for x in tables[:, 3:].ravel()} - used)
    assert past, "the case must name a page past some sequence's context"
    k[:, past], v[:, past] = np.nan, np.nan
    ref = ReferenceBackend().attend(q, jnp.nan_to_num(k), jnp.nan_to_num(v), 0, meta, 0.125)
    got = np.asarray(get_backend(backend).attend(q, jnp.asarray(k), jnp.asarray(v), 0, meta, 0.125))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:n], np.asarray(ref)[:n], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kv_dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_write_matches_xla_scatter(pool_dtype, kv_dtype, block_size):
    """The C++ write stores exactly what XLA's scatter stores (bfloat16: rounded to nearest
    even, NaN kept), in both layers, dropping padding (-1) and out-of-pool slots."""
    rng = np.random.default_rng(11)
    num_blocks = max(10, 160 // block_size)  # at least 160 slots: the slots below fit
    shape = XlaBackend().pool_shape(2, num_blocks, block_size, 2, 32)
    k_pool = jnp.asarray(rng.standard_normal(shape), pool_dtype)
    v_pool = jnp.asarray(rng.standard_normal(shape), pool_dtype)
    k = rng.standard_normal((7, 2, 32)).astype(np.float32)
    k[0, 0, :3] = [np.nan, np.inf, 1 + 2 ** -8]  # a NaN, an infinity, a tie to round to even
    k, v = jnp.asarray(k, kv_dtype), jnp.asarray(rng.standard_normal((7, 2, 32)), kv_dtype)
    total = num_blocks * block_size
    slots = jnp.asarray([0, 5, -1, total - 1, total, 17, 33], jnp.int32)
    write = jax.jit(cpu_attention.write_kv)
    for layer in (0, 1):
        want = XlaBackend().write(k_pool, v_pool, layer, k, v, slots)
        got = write(k_pool, v_pool, jnp.int32(layer), k, v, slots)
        for g, w in zip(got, want):
            assert g.dtype == pool_dtype
            np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_write_is_in_place_when_donated(dtype):
    """No pool-sized temporary, for a bfloat16 pool too (XLA's own scatter into one
    needs a float32 copy of both pools: asserted, so this test knows why the write exists)."""
    shape, sd = (4, 512, 8, 16, 128), jax.ShapeDtypeStruct
    args = (sd(shape, dtype), sd(shape, dtype), sd((), jnp.int32), sd((64, 8, 128), jnp.float32),
            sd((64, 8, 128), jnp.float32), sd((64,), jnp.int32))
    pool_bytes = np.prod(shape) * jnp.dtype(dtype).itemsize

    def temp_bytes(write):
        return jax.jit(write, donate_argnums=(0, 1)).trace(*args).lower().compile() \
            .memory_analysis().temp_size_in_bytes

    assert temp_bytes(cpu_attention.write_kv) < pool_bytes // 100
    if dtype == jnp.bfloat16:
        assert temp_bytes(XlaBackend().write) > pool_bytes


@pytest.mark.parametrize("backend,param_dtype,head_dim,pool_dtype", [
    ("cpu", jnp.bfloat16, 64, jnp.bfloat16), ("cpu", jnp.float32, 64, jnp.float32),
    ("cpu", jnp.float16, 64, jnp.float32), ("xla", jnp.bfloat16, 64, jnp.float32),
    ("cpu", jnp.bfloat16, 8, jnp.float32)])  # not the kernel's shape: the xla path's pool
@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_pool_dtype_follows_what_the_backend_reads_and_writes_in_place(backend, param_dtype,
                                                                        head_dim, pool_dtype,
                                                                        block_size):
    """Where XLA's own ops touch a bfloat16 pool (the `xla` backend, shapes the kernel does
    not take), they copy it through float32 every step: such pools stay float32."""
    assert get_backend(backend).pool_dtype(param_dtype, block_size, head_dim) == pool_dtype
