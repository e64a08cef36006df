"""What a compiled step costs, read from its optimized HLO: XLA's HloCostAnalysis with
three corrections (loops, the pool, the attention kernel) described below. A deviceless
executable has no cost analysis of its own; `scripts/gpu/roofline.py` builds its
estimates on `step_cost`."""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.attention.backend import AttentionBackend
from jpaged.models.config import ModelConfig
from jpaged.pallas_kernels import tuning
from jpaged.pallas_kernels.common import group_padded
from jpaged.utils import cdiv

from .step import Bucket, StepSpecs, backend_for

# A deviceless executable has no cost analysis (`compiled.cost_analysis()` is None:
# "GetCostAnalysis is not supported"), and XLA's HloCostAnalysis, wherever it runs,
# (1) counts a while loop's body once, whatever its trip count (a page loop, or a layer
# scan in other models), (2) counts an in-place scatter into the pool as reading and writing the
# whole pool, and (3) knows nothing of custom calls (a Pallas kernel counts -1).
# `step_cost` runs XLA's HloCostAnalysis over the optimized HLO text and corrects all
# three: loops times their known trip count, pool-shaped buffers taken out (by
# re-analysing the text with the pool 1 and 2 blocks long and extrapolating to 0),
# and the attention kernel added from a model of what its tiles read (`decode_kernel_cost`).

_COST_KEYS = ("flops", "transcendentals", "bytes accessed")


def hlo_text(compiled) -> str:
    """The optimized HLO of a compiled step."""
    return compiled.as_text()


def _hlo_cost(text: str) -> dict[str, float]:
    from jax._src.lib import xla_client as xc
    from jaxlib import _hlo
    module = _hlo.hlo_module_from_text(text)
    client = jax.devices("cpu")[0].client  # any client: the analysis is XLA's generic one
    res = xc._xla.hlo_module_cost_analysis(client, module)
    return {k: float(res.get(k, 0.0)) for k in _COST_KEYS}


_COMP_RE = re.compile(r"^(ENTRY )?(%[\w.\-]+) \(", re.M)
_WHILE_RE = re.compile(r"= .*? while\(.*?body=(%[\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")


def _computations(text: str) -> dict[str, str]:
    """Computation name -> its text (header to closing brace)."""
    heads = list(_COMP_RE.finditer(text))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out[m.group(2)] = text[m.start():end]
    return out


def _as_entry(text: str, name: str) -> str:
    """The module with computation `name` as its entry (the header, whose aliasing
    and layouts describe the old entry, is replaced by a bare one)."""
    text = re.sub(r"^HloModule [^\n]*", "HloModule cost", text, count=1)
    text = re.sub(r"^ENTRY ", "", text, flags=re.M)
    return re.sub(rf"^({re.escape(name)} \()", r"ENTRY \1", text, count=1, flags=re.M)


def loop_corrected_cost(text: str) -> dict[str, float]:
    """XLA's cost of an HLO module with every while loop of known trip count counted
    that many times (nested loops too): cost(c) = raw(c) + sum over loops w in c of
    (n_w * cost(body_w) - raw(body_w))."""
    comps = _computations(text)
    entry = next(m.group(2) for m in _COMP_RE.finditer(text) if m.group(1))
    cache: dict[str, tuple[dict, dict]] = {}

    def cost(name):
        if name in cache:
            return cache[name]
        raw = _hlo_cost(_as_entry(text, name) if name != entry else text)
        total = dict(raw)
        for m in _WHILE_RE.finditer(comps.get(name, "")):
            body, n = m.group(1), int(m.group(2))
            body_total, body_raw = cost(body)
            for k in _COST_KEYS:
                total[k] += n * body_total[k] - body_raw[k]
        cache[name] = (total, raw)
        return cache[name]

    return cost(entry)[0]


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# A collective instruction, sync (`all-reduce(`) or the end of an async pair (`all-reduce-done(`,
# whose result is the collective's result; its `-start` is skipped so each counts once).
_COLLECTIVE_RE = re.compile(
    rf"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) ({'|'.join(COLLECTIVES)})(?:-done)?\(", re.M)
_SLICE_COPY_RE = re.compile(
    r'^\s*(?:ROOT )?%[\w.\-]+ = (\S+) fusion\(.*?"name":"(dynamic_slice_fusion)"', re.M)
_ARRAY_RE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE_RE = re.compile(r"\b(?:calls|to_apply|condition|true_computation|false_computation)="
                        r"(%[\w.\-]+)|branch_computations=\{([^}]*)\}")


def _array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (`f32[64,8192]{1,0}`, or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY_RE.findall(type_text):
        bits = re.match(r"[a-z]+(\d+)", dtype)  # f32, bf16, s8, f8e4m3fn, c64; pred is 1 byte
        total += int(np.prod([int(d) for d in dims.split(",") if d])) * (
            int(bits.group(1)) // 8 if bits else 1)
    return total


def computation_multiplicity(text: str) -> dict[str, int]:
    """How many times each computation runs per execution of the module: the entry once, a
    while body its caller's count times the loop's `known_trip_count` (a loop without one
    is an error: no count would be right), any other callee as often as its caller."""
    comps = _computations(text)
    names = list(comps)  # callees are printed before their callers, the entry last
    runs = dict.fromkeys(names, 0)
    runs[next(m.group(2) for m in _COMP_RE.finditer(text) if m.group(1))] = 1
    for name in reversed(names):
        for line in comps[name].splitlines()[1:]:
            loop = re.search(r" while\(.*?body=(%[\w.\-]+)", line)
            if loop:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                if not trips:
                    raise ValueError(f"while loop {loop.group(1)} has no known trip count")
                runs[loop.group(1)] += runs[name] * int(trips.group(1))
            for m in _CALLEE_RE.finditer(line):
                for callee in (m.group(1),) if m.group(1) else re.findall(r"%[\w.\-]+", m.group(2)):
                    runs[callee] += runs[name]
    return runs


def _sum_results(text: str, pattern: re.Pattern) -> dict[str, dict[str, int]]:
    """Per `pattern`'s group 2: how many matching instructions run per execution and the
    bytes of their results (group 1, the HLO type), loops counted once per trip."""
    runs = computation_multiplicity(text)
    out: dict[str, dict[str, int]] = {}
    for name, body in _computations(text).items():
        for m in pattern.finditer(body):
            kind = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
            kind["count"] += runs[name]
            kind["bytes"] += runs[name] * _array_bytes(m.group(1))
    return out


def collectives(text: str) -> dict[str, dict[str, int]]:
    """Collectives one execution of an (SPMD-partitioned) HLO module runs, per kind present:
    `count` and `bytes` (each one's result buffer on one device, summed)."""
    return _sum_results(text, _COLLECTIVE_RE)


def slice_copies(text: str) -> dict[str, int]:
    """`count` and `bytes` of the slices XLA's GPU `dynamic_slice_fusion`s copy per execution
    (a copy thunk each, reading and writing them once): under a layer scan, each layer's
    weights sliced out of the stack before its matmuls read them."""
    return _sum_results(text, _SLICE_COPY_RE).get("dynamic_slice_fusion", {"count": 0, "bytes": 0})


def _with_blocks(text: str, pool_shape: tuple[int, ...], block_axis: int, blocks: int) -> str:
    dims = ",".join(map(str, pool_shape))
    new = list(pool_shape)
    new[block_axis] = blocks
    return re.sub(rf"\[{dims}\]", "[" + ",".join(map(str, new)) + "]", text)


def cost_without_pool(text: str, pool_shape: tuple[int, ...], block_axis: int) -> dict[str, float]:
    """`loop_corrected_cost` with every pool-shaped buffer taken out: the text analysed
    with the pool 1 and 2 blocks long, extrapolated to 0 blocks. What is left is the
    traffic of weights, activations, the scatter's updates and the kernel's small inputs."""
    c1 = loop_corrected_cost(_with_blocks(text, pool_shape, block_axis, 1))
    c2 = loop_corrected_cost(_with_blocks(text, pool_shape, block_axis, 2))
    return {k: c1[k] - (c2[k] - c1[k]) for k in _COST_KEYS}


def decode_partitions(num_seqs, num_kv_heads, pages, block_size, head_dim, dtype, gpu):
    """(pages_per_compute_block, partitions, pages_per_partition) the decode kernel uses
    for these shapes: the same arithmetic as `paged_attention`."""
    cfg = tuning.decode_params(num_seqs=num_seqs, num_kv_heads=num_kv_heads, pages_per_seq=pages,
                               block_size=block_size, head_dim=head_dim, dtype=dtype, gpu=gpu)
    ppcb = cfg.pages_per_compute_block
    parts = max(1, min(cfg.num_partitions, cdiv(pages, ppcb)))
    per_part = cdiv(cdiv(pages, parts), ppcb) * ppcb
    return ppcb, cdiv(pages, per_part), per_part


def decode_kernel_cost(config: ModelConfig, bucket: Bucket, context_lens, gpu: str,
                       kv_dtype=jnp.bfloat16) -> dict[str, float]:
    """What one layer's decode kernel reads, writes and computes, from its tiling: each
    (sequence, KV head, partition) program loads its q rows (GQA group padded to 16),
    walks the live pages of its partition `pages_per_compute_block` at a time (the last
    tile may run past the context: read, then masked), and writes float32 partials.
    `min_kv_bytes`: every live K/V byte read exactly once."""
    isz = jnp.dtype(kv_dtype).itemsize
    KV, D, bs = config.num_kv_heads, config.head_dim, bucket.block_size
    gpad = group_padded(config.q_per_kv, 16)
    ppcb, parts, per_part = decode_partitions(bucket.num_seqs, KV, bucket.pages, bs, D, kv_dtype, gpu)
    ctx = np.zeros(bucket.num_seqs, np.int64)
    ctx[:len(context_lens)] = context_lens
    live = cdiv(ctx, bs)
    kv_tokens = 0
    for p in range(parts):
        in_part = np.clip(live - p * per_part, 0, per_part)
        kv_tokens += int((cdiv(in_part, ppcb) * ppcb * bs).sum())
    programs = bucket.num_seqs * KV * parts
    kv_bytes = kv_tokens * KV * D * isz * 2
    other = programs * (gpad * D * isz + gpad * D * 4 + 2 * gpad * 4) \
        + bucket.num_seqs * (bucket.pages + 1) * 4
    return {
        "kv_bytes": float(kv_bytes),
        "bytes accessed": float(kv_bytes + other),
        "min_kv_bytes": float(int(ctx.sum()) * KV * D * isz * 2),
        "flops": float(kv_tokens * KV * gpad * D * 4),  # two dots per tile, padded rows included
        "useful_flops": float(int(ctx.sum()) * config.num_heads * D * 4),
        "grid": (bucket.num_seqs, KV, parts),
    }


def step_cost(compiled, config: ModelConfig, bucket: Bucket, context_lens, gpu: str,
              backend: AttentionBackend | None = None, kv_dtype=jnp.bfloat16) -> dict[str, Any]:
    """FLOPs and HBM bytes of one decode step (all layers) from its compiled program:
    XLA's analysis of everything but the pool (loops corrected), plus the pool traffic
    that really happens: the scatter writes N new K/V rows per layer, and the decode
    kernel's reads (`decode_kernel_cost`) per layer. Also `xla_raw`: what XLA's analysis
    says unmodified, for comparison."""
    backend = backend or backend_for(gpu)
    shape = backend.pool_shape(config.num_layers, bucket.num_blocks, bucket.block_size,
                               config.num_kv_heads, config.head_dim)
    text = hlo_text(compiled)
    rest = cost_without_pool(text, shape, backend.block_axis)
    L = config.num_layers
    kernel = decode_kernel_cost(config, bucket, context_lens, gpu, kv_dtype)
    write = bucket.num_tokens * config.num_kv_heads * config.head_dim \
        * jnp.dtype(kv_dtype).itemsize * 2
    return {
        "flops": rest["flops"] + L * kernel["flops"],
        "bytes": rest["bytes accessed"] + L * (kernel["bytes accessed"] + write),
        "xla_flops": rest["flops"], "xla_bytes": rest["bytes accessed"],
        "kernel": {k: (v * L if k != "grid" else v) for k, v in kernel.items()},
        "kv_write_bytes": L * write,
        "xla_raw": _hlo_cost(text),
    }


def weight_bytes(specs_or_params) -> int:
    """Bytes of the parameters (of a `StepSpecs`, or of a parameter tree)."""
    params = specs_or_params.params if isinstance(specs_or_params, StepSpecs) else specs_or_params
    return int(sum(np.prod(p.shape) * jnp.dtype(p.dtype).itemsize
                   for p in jax.tree.leaves(params)))
