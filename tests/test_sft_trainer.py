"""SFTTrainer: the loss is the token-mean NLL of the response tokens (checked against transformers'
own causal-LM loss with the prompt masked), training lowers it, and RFT records keep only distinct
verified-correct completions."""

import pytest
import torch
from conftest import load_tiny

from alignkit.data.collate import GroupCollator
from alignkit.data.tokenize import tokenize_group
from alignkit.tasks.arithmetic import make_problems
from alignkit.trainers import SFTConfig, SFTTrainer
from alignkit.trainers.sft import rft_records, sft_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3, report_to="none",
                use_cpu=True, max_length=128, logging_steps=1, seed=0, save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return SFTConfig(**base)


def test_loss_equals_causal_lm_loss_with_prompt_masked(tiny_model_path, tokenizer, tmp_path):
    model = load_tiny(tiny_model_path)
    records = sft_records(make_problems(3, seed=1))
    trainer = SFTTrainer(model=model, args=_config(tmp_path), train_dataset=records, processing_class=tokenizer)
    groups = [tokenize_group(tokenizer, r["prompt"], [r["response"]]) for r in records]
    batch = GroupCollator(tokenizer.pad_token_id, "shared_prompt")(groups)
    loss, metrics = trainer.compute_batch_loss(model, batch)

    # direct: one sequence at a time, labels -100 on the prompt, summed over all response tokens
    total, count = 0.0, 0
    for g in groups:
        ids = torch.tensor([g["prompt_ids"] + g["response_ids"][0]])
        labels = ids.clone()
        labels[0, : len(g["prompt_ids"])] = -100
        n = len(g["response_ids"][0])
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    assert float(loss) == pytest.approx(total / count, abs=1e-5)
    assert float(metrics["loss/sft"]) == pytest.approx(float(loss))


def test_training_lowers_the_loss_and_saves(tiny_model_path, tokenizer, tmp_path):
    model = load_tiny(tiny_model_path)
    records = sft_records(make_problems(16, seed=2))
    config = _config(tmp_path, max_steps=12)
    trainer = SFTTrainer(model=model, args=config, train_dataset=records, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss/sft"] for h in trainer.state.log_history if "loss/sft" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert trainer.reference_mode == "none" and trainer.ref_model is None
    trainer.save_model(config.output_dir)
    assert (tmp_path / "out" / "config.json").exists()


def test_rft_records_keep_distinct_correct_completions():
    rows = [
        {"prompt": "p1", "completions": [{"text": "a", "correct": True}, {"text": "a", "correct": True},
                                         {"text": "b", "correct": False}, {"text": "c", "correct": True}]},
        {"prompt": "p2", "completions": [{"text": "x", "correct": False}]},
        {"prompt": "p3", "completions": [{"text": " ", "correct": True}, {"text": "d", "correct": True}]},
    ]
    assert rft_records(rows) == [{"prompt": "p1", "response": "a"}, {"prompt": "p1", "response": "c"},
                                 {"prompt": "p3", "response": "d"}]
    assert rft_records(rows, per_prompt=1) == [{"prompt": "p1", "response": "a"}, {"prompt": "p3", "response": "d"}]


def test_a_term_missing_from_a_batch_is_left_out_of_the_logged_average(tiny_model_path, tokenizer, tmp_path):
    """A method logs NaN for a term its batch does not have (e.g. no desirable example): the step's average
    is over the batches that had it, not dragged to NaN or zero."""
    records = sft_records(make_problems(4, seed=1))

    class Sometimes(SFTTrainer):
        calls = 0

        def compute_batch_loss(self, model, batch):
            loss, metrics = super().compute_batch_loss(model, batch)
            Sometimes.calls += 1
            return loss, {**metrics, "only/odd": torch.tensor(float(Sometimes.calls) if Sometimes.calls % 2 else float("nan"))}

    trainer = Sometimes(model=load_tiny(tiny_model_path), args=_config(tmp_path, max_steps=4, logging_steps=4),
                        train_dataset=records, processing_class=tokenizer)
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "only/odd" in h]
    assert logged["only/odd"] == pytest.approx((1 + 3) / 2)  # calls 1 and 3; calls 2 and 4 had no value
