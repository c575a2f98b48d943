"""Throughput and model FLOPs utilisation: one FLOPs formula (the model's), one table of peaks.

MFU is per device: the model FLOPs of the real (non-padding) tokens the whole job trained on per
second, divided by the peak of all its devices together (world size x one device's peak). Padding
is not counted: the model computes on it, but it is not useful work, and a padded recipe would
otherwise look faster than a packed one.
"""

from __future__ import annotations

import torch

# Dense (non-sparse) peak FLOP/s per device, from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() in order, so a variant's row comes before its family's default:
# "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" have lower clocks (and, PCIe, fewer SMs) than the SXM
# board, whose name carries no form factor ("NVIDIA H100 80GB HBM3"). fp32 is the non-tensor-core
# peak (what fp32 matmuls reach with TF32 off, torch's default).
PEAK_FLOPS: list[tuple[str, str, float]] = [
    ("H100 PCIe", "bf16", 756e12),
    ("H100 PCIe", "fp32", 51e12),
    ("H100 NVL", "bf16", 835e12),
    ("H100 NVL", "fp32", 60e12),
    ("H100", "bf16", 989e12),  # SXM5
    ("H100", "fp32", 67e12),
    ("GH200", "bf16", 989e12),
    ("GH200", "fp32", 67e12),
    ("H200 NVL", "bf16", 835e12),
    ("H200 NVL", "fp32", 60e12),
    ("H200", "bf16", 989e12),  # SXM
    ("H200", "fp32", 67e12),
    ("A100", "bf16", 312e12),  # SXM4 and PCIe alike
    ("A100", "fp32", 19.5e12),
]


def peak_flops_for(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of the device called `device_name` in `dtype`, or None when it is not listed."""
    for model, kind, peak in PEAK_FLOPS:
        if model in device_name and kind == dtype:
            return peak
    return None


def device_peak_flops(device: torch.device, dtype: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of this device in `dtype`: `override_tflops` (train.peak_tflops) when set, else the
    table's; None when unknown (CPUs, unlisted GPUs: MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device), dtype)


def mfu(flops_per_token: float, real_tokens_per_second: float, peak: float | None, n_devices: int = 1) -> float | None:
    """Per-device MFU: `real_tokens_per_second` is the whole job's (all ranks) rate of non-padding tokens."""
    return None if not peak else flops_per_token * real_tokens_per_second / (peak * n_devices)
