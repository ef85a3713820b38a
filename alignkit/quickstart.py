"""``alignkit quickstart``: an offline, CPU-only run of the whole DPO path in about a minute.

1. build a tiny Qwen2 and a tokenizer trained offline;
2. generate the synthetic arithmetic task: gold solutions (chosen) vs one-slip solutions (rejected);
3. measure, on held-out pairs, how often the model prefers the correct solution;
4. train with :class:`~alignkit.trainers.DPOTrainer` (checkpoints, progress bar);
5. measure again, save, and load the result back with ``from_pretrained``.

Later stages (on-policy negatives, verification, flip report) join this as they land.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.data.collate import GroupCollator
from alignkit.data.tokenize import tokenize_group
from alignkit.modeling import make_tiny_model
from alignkit.scoring import score_responses
from alignkit.tasks.arithmetic import make_preference_pairs
from alignkit.trainers import DPOConfig, DPOTrainer


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs: list[dict], batch_size: int = 32) -> float:
    """Share of pairs where log π(chosen|x) > log π(rejected|x) under ``model``."""
    model.eval()
    collate = GroupCollator(tokenizer.pad_token_id, "shared_prompt")
    groups = [tokenize_group(tokenizer, p["prompt"], [p["chosen"], p["rejected"]]) for p in pairs]
    wins = 0
    for i in range(0, len(groups), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(groups[i : i + batch_size]).items()}
        chosen, rejected = score_responses(model, batch).logps.view(-1, 2).unbind(1)
        wins += int((chosen > rejected).sum())
    return wins / len(groups)


def run_quickstart(output_dir: str = "outputs/quickstart", steps: int = 200, seed: int = 0) -> dict:
    out = Path(output_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"[1/5] tiny model and tokenizer -> {out / 'tiny-model'}")
    model_path = make_tiny_model(out / "tiny-model", "qwen2", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)

    print("[2/5] synthetic arithmetic task: 512 training pairs, 128 held-out pairs")
    train = make_preference_pairs(512, seed=seed)
    held_out = make_preference_pairs(128, seed=seed + 10_000)
    print(f"      e.g. prompt: {train[0]['prompt']!r}\n           rejected: {train[0]['rejected']!r}")

    seen = train[:128]
    before = preference_accuracy(model, tokenizer, held_out)
    before_seen = preference_accuracy(model, tokenizer, seen)
    print(f"[3/5] before DPO, the model prefers the correct solution on {before_seen:.1%} of 128 training pairs "
          f"and {before:.1%} of 128 held-out pairs")

    print(f"[4/5] DPO, {steps} steps")
    config = DPOConfig(
        output_dir=str(out / "dpo"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        beta=0.1,
        logging_steps=10,
        save_steps=max(steps // 2, 1),
        save_total_limit=1,
        report_to="none",
        use_cpu=True,
        seed=seed,
        max_length=256,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(config.output_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(config.output_dir)
    after = preference_accuracy(reloaded, tokenizer, held_out)
    after_seen = preference_accuracy(reloaded, tokenizer, seen)
    print(f"[5/5] after DPO (model reloaded from {config.output_dir}): {after_seen:.1%} of the training pairs, "
          f"{after:.1%} of the held-out pairs.\n      A random tiny model has not learnt arithmetic, so DPO alone "
          "mostly fits the pairs it saw; SFT and on-policy negatives join this quickstart in later releases.")
    summary = {"steps": steps, "model_dir": config.output_dir,
               "train_pairs_preference_accuracy": {"before": before_seen, "after": after_seen},
               "held_out_preference_accuracy": {"before": before, "after": after}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary
