"""Plug-ins named, not imported: how a lower layer reaches code of a layer above it.

Imports flow one way (docs/ARCHITECTURE.md, checked by import-linter). Where a lower layer offers a
feature whose code lives above it (data_pipeline's `model` density annotator loads a trained
checkpoint with pretrain; `build --slurm` and `launch.backend=slurm` submit through slurm), it names
the function as "package.module:attribute" and resolves it here when the feature is used, so the
lower layer neither imports the upper one nor pays for it when the feature is off.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_plugin(spec: str, what: str) -> Any:
    """The object `spec` = "package.module:attribute" names; `what` says which feature asked for it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what}: plug-in {spec!r} must be written package.module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"{what} needs {module_name} ({spec}), which cannot be imported: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{what}: {module_name} has no {attr!r} ({spec})") from None
