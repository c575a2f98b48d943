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
