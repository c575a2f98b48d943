"""Which torch device a run or a tool uses: the one resolver behind `train.device`, every command
line's `--device` and the density annotators' `device` (it sits with config_file.py and fsutil.py,
the helpers every package may import)."""

from __future__ import annotations

import torch


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto` = CUDA when a device is visible, else CPU; `cpu`, `cuda`, `cuda:N` as named. A CUDA
    device asked for on a machine without one is refused, naming `key` (the setting or flag)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key}={name} but no CUDA device is visible; use {key}=cpu or auto")
    return torch.device(name)
