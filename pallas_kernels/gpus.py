"""The NVIDIA GPUs jpaged targets, in one table: what the kernels' tunables read (SMs,
shared memory, pipeline stages) and what ahead-of-time compiles and roofline estimates
read (the XLA target config shipped in `jpaged/aot/gpu_targets/`, peak bfloat16 FLOP/s,
HBM bandwidth and memory, NVLink bandwidth). Plain data: no jax here."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    target_config: str  # XLA GpuTargetConfigProto text file in jpaged/aot/gpu_targets/
    sms: int  # streaming multiprocessors: how many CTAs make one wave
    smem_kib: int  # max dynamic shared memory per CTA (pipeline buffers)
    stages: int  # cp.async (A100) / TMA-era (H100) pipeline depth
    peak_flops: float  # dense bfloat16 tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s
    memory_bytes: int
    # NVLink bytes/s ONE WAY per GPU (to the NVSwitch fabric of an 8-GPU SXM board), half
    # the bidirectional figure NVIDIA quotes. The tensor-parallel roofline uses this one:
    # in a ring all-reduce every GPU sends and receives at once, so each direction carries
    # a full 2(N-1)/N of the buffer and the one-way rate bounds the time.
    nvlink_bandwidth: float


# H100's larger smem and higher memory latency x bandwidth product pay for one more
# pipeline stage (more K/V bytes in flight per SM).
GPUS = {
    # NVIDIA A100-SXM4-80GB: 108 SMs, 164 KiB smem per CTA, 312 TFLOP/s bf16 dense,
    # 2.039 TB/s HBM2e; NVLink 3: 12 links, 600 GB/s bidirectional = 300 GB/s one way.
    "a100": Gpu("a100", target_config="a100_sxm_80.txtpb", sms=108, smem_kib=164, stages=2,
                peak_flops=312e12, bandwidth=2.039e12, memory_bytes=80 << 30,
                nvlink_bandwidth=300e9),
    # NVIDIA H100 SXM 80GB: 132 SMs, 227 KiB smem per CTA, 989 TFLOP/s bf16 dense,
    # 3.35 TB/s HBM3; NVLink 4: 18 links, 900 GB/s bidirectional = 450 GB/s one way.
    "h100": Gpu("h100", target_config="h100_sxm.txtpb", sms=132, smem_kib=227, stages=3,
                peak_flops=989e12, bandwidth=3.35e12, memory_bytes=80 << 30,
                nvlink_bandwidth=450e9),
}
