"""Layering that a tool enforces (issue 21 item 5): the import-linter contracts in pyproject.toml
(`[tool.importlinter]`) hold, and every package pyproject installs travels in the Slurm code snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_slurm_snapshot_copies_every_installed_package():
    from slurm.executor import PACKAGES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == sorted(PACKAGES)
