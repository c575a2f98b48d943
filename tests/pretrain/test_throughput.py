"""MFU (issue 18.3): per device, from real tokens, with each H100 board's own peak."""

import pytest
import torch

from pretrain import throughput
from pretrain.throughput import device_peak_flops, mfu, peak_flops_for


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),  # SXM5: the name carries no form factor
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 PCIe", "fp32", 51e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_by_device_name(name, dtype, peak):
    assert peak_flops_for(name, dtype) == peak


def test_device_peak_reads_the_cuda_name_and_honours_an_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peak_flops(torch.device("cuda", 0), "bf16") == 756e12
    assert device_peak_flops(torch.device("cuda", 0), "bf16", override_tflops=500) == 500e12
    assert device_peak_flops(torch.device("cpu"), "fp32") is None
    assert device_peak_flops(torch.device("cpu"), "fp32", override_tflops=2) == 2e12


def test_mfu_divides_the_jobs_real_token_rate_by_every_devices_peak():
    # 8 devices together at 8 x 1000 real tokens/s of a 1e9 FLOPs/token model on 1e13 FLOP/s devices: 10%
    assert mfu(1e9, 8000.0, 1e13, n_devices=8) == pytest.approx(0.1)
    assert mfu(1e9, 8000.0, None, n_devices=8) is None


def test_more_specific_rows_come_first():
    names = [m for m, _, _ in throughput.PEAK_FLOPS]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert a not in b or a == b, f"{a!r} would shadow {b!r}"
