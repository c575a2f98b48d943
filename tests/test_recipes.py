"""Every recipe under configs/ is documented (README.md or docs/*.md name it) and loads through the
config loader, so the README's recipe list and the recipes stay true to each other."""

from pathlib import Path

import pytest

from pretrain.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
DOCS = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])


def test_there_are_recipes():
    assert "quickstart.yaml" in RECIPES and len(RECIPES) > 3


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_documented_and_loads(recipe):
    assert f"`{recipe}`" in DOCS or f"configs/{recipe}" in DOCS, f"configs/{recipe} is in no README or docs/*.md"
    assert load_config(REPO / "configs" / recipe).name
