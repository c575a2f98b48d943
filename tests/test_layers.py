"""Layering that a tool enforces (issue 21 item 5): the import-linter contracts in pyproject.toml
(`[tool.importlinter]`) hold, and every package pyproject installs travels in the Slurm code snapshot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_slurm_snapshot_copies_every_installed_package():
    from slurm.executor import PACKAGES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == sorted(PACKAGES)


def test_import_contracts_hold():
    """`lint-imports` with pyproject's contracts: the layers (slurm > pretrain > parallel >
    data_pipeline > common), parallel without data_pipeline, and no cycle inside any package."""
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    out = subprocess.run(["lint-imports", "--no-logo", "--no-cache"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_named_plug_ins_resolve():
    """The functions lower layers name instead of importing (common/plugins.py) exist under those names,
    so a rename above cannot silently break `model` density annotation, `build --slurm` or the Slurm launch."""
    from common.plugins import load_plugin
    from data_pipeline.build import SLURM_BUILD
    from data_pipeline.density.annotators import MODEL_LOADER
    from pretrain.checkpoint import load_model_for_inference
    from pretrain.launch import SLURM_BACKEND
    from slurm.data import main_slurm
    from slurm.submit import choose_backend, launch

    assert load_plugin(MODEL_LOADER, "t") is load_model_for_inference
    assert load_plugin(SLURM_BUILD, "t") is main_slurm
    assert load_plugin(f"{SLURM_BACKEND}:choose_backend", "t") is choose_backend
    assert load_plugin(f"{SLURM_BACKEND}:launch", "t") is launch
    with pytest.raises(ImportError, match="no 'nope'"):
        load_plugin("slurm.submit:nope", "launch.backend=slurm")
    with pytest.raises(ValueError, match="package.module:attribute"):
        load_plugin("slurm.submit", "launch.backend=slurm")
