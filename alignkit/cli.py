"""``alignkit`` command line.

    alignkit train RECIPE.yaml [--key value ...]     train with a recipe (also: accelerate launch -m alignkit train ...)
    alignkit quickstart [--output_dir DIR]           offline end-to-end demo on a tiny model
    alignkit tiny-model PATH [--arch qwen2|llama]    build a tiny offline model + tokenizer
"""

from __future__ import annotations

import argparse
import sys


def _train(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: alignkit train RECIPE.yaml [--key value ...]", file=sys.stderr)
        return 2
    from alignkit.recipes import parse_recipe, run_recipe

    run_recipe(*parse_recipe(argv[0], argv[1:]))
    return 0


def _tiny_model(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit tiny-model")
    parser.add_argument("path")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    from alignkit.modeling import make_tiny_model

    print(make_tiny_model(a.path, a.arch, hidden_size=a.hidden_size, num_layers=a.num_layers, seed=a.seed))
    return 0


def _quickstart(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit quickstart")
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=200)
    a = parser.parse_args(argv)
    from alignkit.quickstart import run_quickstart

    run_quickstart(a.output_dir, steps=a.steps)
    return 0


COMMANDS = {"train": _train, "quickstart": _quickstart, "tiny-model": _tiny_model}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
