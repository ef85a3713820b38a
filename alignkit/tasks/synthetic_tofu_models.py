"""The synthetic TOFU-like task's two starting models, fine-tuned with :class:`~alignkit.trainers.sft.SFTTrainer`.

* ``full``: a tiny model fine-tuned on every fact of the world (the model to unlearn from);
* ``retain``: the same random initialisation fine-tuned on the retain split only (the model that never saw
  the forget set: the target of forget quality).

The task's data is :mod:`alignkit.tasks.synthetic_tofu`; the models are evaluated with
:mod:`alignkit.evaluation.unlearning`. Command line (also ``python -m alignkit.tasks.synthetic_tofu``)::

    python -m alignkit.tasks.synthetic_tofu_models --output_dir outputs/tofu_tiny [--forget_split forget10]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.evaluation.unlearning import evaluate_unlearning, save_results
from alignkit.modeling import make_tiny_model
from alignkit.tasks.synthetic_tofu import SyntheticTofuSpec, all_records, corpus, eval_items, records, split_people
from alignkit.trainers.sft import finetune as sft_finetune

logger = logging.getLogger(__name__)

BUILD_VERSION = 2  # 2: fine-tuned with SFTTrainer (1: a hand-written loop)


def make_task_model(path, spec: SyntheticTofuSpec = SyntheticTofuSpec(), *, hidden_size: int = 128,
                    num_layers: int = 4, seed: int = 0) -> str:
    """A random tiny Qwen2 whose tokenizer is trained on this task's text (see ``make_tiny_model``)."""
    return make_tiny_model(path, "qwen2", hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                           texts=corpus(spec))


def finetune(model, tokenizer, train_records: list[dict], *, epochs: int = 40, batch_size: int = 16,
             learning_rate: float = 3e-3, warmup_ratio: float = 0.05, seed: int = 0,
             output_dir: str | Path | None = None) -> list[float]:
    """Supervised fine-tuning (token-mean NLL of the responses) with :class:`~alignkit.trainers.sft.SFTTrainer`:
    AdamW (weight decay 0.01), a cosine schedule after ``warmup_ratio`` of the steps of linear warm-up (a
    ratio in [0, 1): transformers' ``warmup_steps`` takes it as one), gradients clipped
    at 1. Returns the mean training loss of each epoch. ``output_dir`` is the trainer's (nothing is saved
    there; default a temporary directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        return sft_finetune(model, tokenizer, train_records, str(output_dir or tmp), epochs=epochs,
                            batch_size=batch_size, learning_rate=learning_rate, lr_scheduler_type="cosine",
                            warmup_steps=warmup_ratio, weight_decay=0.01, seed=seed, max_length=128)


def build_task_models(output_dir, *, forget_split: str = "forget10", spec: SyntheticTofuSpec = SyntheticTofuSpec(),
                      epochs: int = 40, learning_rate: float = 3e-3, hidden_size: int = 128, num_layers: int = 4,
                      evaluate: bool = True) -> dict[str, str]:
    """The two starting points of the synthetic unlearning task, cached in ``output_dir``:

    * ``full``: a tiny model fine-tuned on every fact (the model to unlearn from);
    * ``retain``: the same random initialisation fine-tuned on the retain split only (the model that
      never saw the forget set: the target of forget quality).

    With ``evaluate``, each gets ``eval.json`` (:func:`alignkit.evaluation.unlearning.evaluate_unlearning`
    on the forget and retain splits). A directory already holding a model built with the same settings
    is reused. Returns ``{"base", "full", "retain"}`` paths.
    """
    if not forget_split.startswith("forget"):
        raise ValueError(f"forget_split must be a forgetNN split, got {forget_split!r}")
    split_people(forget_split, spec.num_people)  # a valid split of this world
    retain_split = "retain" + str(100 - int(forget_split[len("forget") :]))
    out = Path(output_dir)
    base = make_task_model(out / "base", spec, hidden_size=hidden_size, num_layers=num_layers, seed=spec.seed)
    settings = {"spec": vars(spec), "forget_split": forget_split, "epochs": epochs, "learning_rate": learning_rate,
                "hidden_size": hidden_size, "num_layers": num_layers, "build": BUILD_VERSION}
    paths = {"base": base}
    for name, train in (("full", all_records(spec)), ("retain", records(retain_split, spec))):
        path = out / name
        stamp = path / "synthetic_tofu.json"
        paths[name] = str(path)
        if stamp.exists() and json.loads(stamp.read_text()).get("settings") == settings:
            continue
        torch.manual_seed(spec.seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        history = finetune(model, tokenizer, train, epochs=epochs, learning_rate=learning_rate, seed=spec.seed,
                           output_dir=out / "sft_runs" / name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        summary = None
        if evaluate:
            results = evaluate_unlearning(
                model, tokenizer, {"forget": eval_items(forget_split, spec), "retain": eval_items(retain_split, spec)}
            )
            save_results(results, path / "eval.json")
            summary = results["summary"]
        stamp.write_text(json.dumps({"settings": settings, "final_train_loss": history[-1], "summary": summary}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.tasks.synthetic_tofu_models", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/tofu_tiny")
    parser.add_argument("--forget_split", default="forget10")
    parser.add_argument("--num_people", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    spec = SyntheticTofuSpec(num_people=a.num_people, seed=a.seed)
    paths = build_task_models(a.output_dir, forget_split=a.forget_split, spec=spec, epochs=a.epochs,
                              learning_rate=a.learning_rate)
    for name in ("full", "retain"):
        summary = json.loads((Path(paths[name]) / "synthetic_tofu.json").read_text())["summary"]
        print(f"{name}: {paths[name]}\n  {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
