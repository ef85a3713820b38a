"""alignkit's DPO loss and gradients equal trl.DPOTrainer's (loss_type=["sigmoid"]) on the same model and batch."""

import copy

import pytest
import torch
from conftest import load_tiny

from alignkit.tasks.arithmetic import make_preference_pairs
from alignkit.trainers import DPOConfig, DPOTrainer


def _pairs():
    pairs = make_preference_pairs(6, seed=3)
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]


def _trl_loss_and_grads(model, ref, tokenizer, pairs, tmp_path):
    import trl
    from datasets import Dataset

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type=["sigmoid"],
        beta=0.1,
        per_device_train_batch_size=len(pairs),
        report_to="none",
        use_cpu=True,
        max_length=None,
        bf16=False,  # TRL defaults to bf16 autocast, which would make the reference pass differ at 1e-5
    )
    trainer = trl.DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _alignkit_loss_and_grads(model, ref, tokenizer, pairs, tmp_path, layout):
    args = DPOConfig(
        output_dir=str(tmp_path / f"ak-{layout}"),
        loss_type="sigmoid",
        beta=0.1,
        per_device_train_batch_size=len(pairs),
        report_to="none",
        use_cpu=True,
        max_length=None,
        score_layout=layout,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_dpo_loss_and_grads_match_trl(tiny_model_path, tokenizer, tmp_path, layout):
    torch.manual_seed(0)
    base = load_tiny(tiny_model_path)
    # move the policy away from the reference so the log-ratios (and the loss) are not trivially zero
    policy = copy.deepcopy(base)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pairs = _pairs()

    trl_loss, trl_grads = _trl_loss_and_grads(
        copy.deepcopy(policy), copy.deepcopy(base), tokenizer, pairs, tmp_path
    )
    ak_loss, ak_grads = _alignkit_loss_and_grads(
        copy.deepcopy(policy), copy.deepcopy(base), tokenizer, pairs, tmp_path, layout
    )
    assert abs(trl_loss.item() - 0.6931) > 1e-3, "loss is log 2: policy and reference coincide"
    torch.testing.assert_close(ak_loss, trl_loss, atol=1e-5, rtol=0)
    assert set(ak_grads) == set(trl_grads) and len(ak_grads) > 0
    for name in trl_grads:
        torch.testing.assert_close(ak_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)
