"""Published per-chip figures of the accelerators the dry run compiles for: THE one table, with its sources.

Used for `fits` (memory capacity) and the roofline lower bound of a step (peak dense bf16 FLOP/s, HBM bandwidth).
These are datasheet peaks, never measurements: a real step is slower than any bound computed from them.

Sources (read 2026-12): Cloud TPU system-architecture pages, https://cloud.google.com/tpu/docs/v4 , /v5e , /v5p ,
/v6e ("Peak compute per chip (bf16)", "HBM capacity / bandwidth per chip"); NVIDIA H100 and H200 Tensor Core GPU
datasheets (SXM, dense BF16 Tensor Core: the 1,979 TFLOPS headline is with 2:4 sparsity, dense is half). The
NVIDIA capacities are the `device_memory_size` of XLA's target specs (gpu_specs/*.txtpb), the bytes CUDA reports.
TPU "GB" of HBM is taken as GiB (16 GiB of HBM2 on a v5e, 32 GiB on a v4 / v6e, 95 GiB on a v5p).
"""

import dataclasses

_GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # as jax's device_kind spells it on the real device
  hbm_bytes: int  # memory one device can address
  hbm_bytes_per_s: float  # peak HBM bandwidth
  bf16_flops_per_s: float  # peak dense bf16 matmul rate
  source: str


CHIPS = {
    "v4": Chip("TPU v4", 32 * _GIB, 1200e9, 275e12, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5 lite", 16 * _GIB, 819e9, 197e12, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5", 95 * _GIB, 2765e9, 459e12, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6 lite", 32 * _GIB, 1638e9, 918e12, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 80GB HBM3", 84942979072, 3.35e12, 989.4e12, "NVIDIA H100 datasheet (SXM5)"),
    "h200": Chip("NVIDIA H200 141GB HBM3e", 151397597184, 4.8e12, 989.4e12, "NVIDIA H200 datasheet (SXM)"),
}


def table() -> list[dict]:
  """The table as rows (docs, the report)."""
  return [
      {
          "chip": key,
          "device_kind": c.name,
          "hbm_gib": round(c.hbm_bytes / _GIB, 2),
          "hbm_tb_per_s": c.hbm_bytes_per_s / 1e12,
          "bf16_tflops": c.bf16_flops_per_s / 1e12,
          "source": c.source,
      }
      for key, c in CHIPS.items()
  ]
