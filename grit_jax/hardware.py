"""One table of accelerator chips, matched on the exact ``device_kind`` each chip reports.

Used by training (MFU in the log), ahead-of-time compilation (memory and roofline of a TPU
slice) and the HLO cost model. Figures are the vendors' per-chip specifications:

- TPU (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): peak bf16 FLOP/s, HBM capacity and
  bandwidth; ``ici_bw`` is the pod's all-reduce bandwidth divided by its chips (v4 1.1 PB/s over
  4096 chips, v5e 51.2 TB/s over 256, v6e 102.4 TB/s over 256; v5p half its 1200 GB/s
  bidirectional ICI); ``dcn_bw`` the data-centre network per chip (v5p 50 Gbps; v5e 2 x 100 Gbps
  per 8-chip host), None where no figure is published.
- NVIDIA: dense bf16 tensor-core peak, HBM capacity and bandwidth (datasheets).

The device kinds are what jax reports (``jax.devices()[0].device_kind``); libtpu describes v5p
chips as "TPU v5" and v5e as "TPU v5 lite", so matching is exact, never by substring.
"""

from __future__ import annotations

import dataclasses
import os

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one accelerator."""

    name: str  # the product name users know (v5p, v6e, H100)
    device_kind: str  # exactly what jax reports
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    ici_bw: float | None = None  # bytes/s per chip for collectives inside a slice (see above)
    dcn_bw: float | None = None  # bytes/s per chip across slices


CHIPS: tuple[Chip, ...] = (
    Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 268e9),
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 200e9, 25e9 / 8),
    Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 600e9, 50e9 / 8),
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1638e9, 400e9),
    Chip("A100-40GB", "NVIDIA A100-SXM4-40GB", 312e12, 40e9, 1555e9),
    Chip("A100-80GB", "NVIDIA A100-SXM4-80GB", 312e12, 80e9, 2039e9),
    Chip("H100", "NVIDIA H100 80GB HBM3", 989e12, 80e9, 3350e9),
    Chip("H200", "NVIDIA H200", 989e12, 141e9, 4800e9),
)
BY_KIND = {c.device_kind: c for c in CHIPS}


TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")  # what a TPU VM's chips appear as


def on_tpu_vm() -> bool:
    """Whether this host has TPU chips attached (checked without starting a backend)."""
    return any(os.path.exists(f) for f in TPU_DEVICE_FILES)


def chip(device_kind: str) -> Chip | None:
    """The chip whose device_kind is exactly this one; None for unknown kinds (CPU)."""
    return BY_KIND.get(device_kind)


def require_chip(device_kind: str) -> Chip:
    """chip(), or a ValueError listing the known kinds."""
    found = chip(device_kind)
    if found is None:
        raise ValueError(f"no figures for device kind {device_kind!r} (known: "
                         f"{sorted(BY_KIND)}); set --config.peak_flops for MFU")
    return found


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s per device: ``override`` if > 0, else the table, else None."""
    if override and override > 0:
        return float(override)
    found = chip(device_kind)
    return None if found is None else found.peak_flops
