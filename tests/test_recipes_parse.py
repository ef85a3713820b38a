"""Every recipe under recipes/ parses with the installed transformers (keys, types, method): a recipe a user
copies must not fail on an unknown or renamed key. GPU recipes ask for bf16, which TrainingArguments refuses
on a machine without one, so bf16 is switched off here; nothing is loaded or trained."""

from pathlib import Path

import pytest

from alignkit.recipes import METHODS, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 15


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(path):
    recipe = parse_recipe(path, ["--bf16", "false"])
    assert recipe.method in METHODS
    assert recipe.config.output_dir and recipe.model_args.model_name_or_path
    assert recipe.data_args.train_data, f"{path.name}: no train_data"
