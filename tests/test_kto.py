"""KTO: the loss equals a direct re-computation of Eq. 7-8 (reference point clamped at 0, no gradient through
it); loss AND gradients equal trl.KTOTrainer's (TRL 1.16, public API: trl.KTOTrainer / trl.KTOConfig) on the same
tiny model and batch, for unpaired and for preference records; the trainer reads unpaired, preference and
negatives-only records, logs each term and pushes undesirable responses down; the recipe runs."""

import copy
import math
import os

import pytest
import torch
from conftest import load_tiny

from alignkit.data.records import RecordError
from alignkit.losses import kto_loss
from alignkit.tasks.arithmetic import make_preference_pairs
from alignkit.trainers.kto import KTOConfig, KTOTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _direct(policy, ref, desirable, kl, beta, wd, wu):
    z = max(0.0, kl)
    out = []
    for p, r, d in zip(policy, ref, desirable):
        s = 1 / (1 + math.exp(-beta * ((p - r) - z if d else z - (p - r))))
        out.append((wd if d else wu) * (1 - s))
    return out


@pytest.mark.parametrize("kl", [0.7, -0.4])  # a positive estimate, and one the clamp sets to 0
def test_loss_equals_a_direct_recomputation(kl):
    g = torch.Generator().manual_seed(0)
    policy = (torch.randn(7, generator=g, dtype=torch.float64) * 3 - 20).requires_grad_(True)
    ref = torch.randn(7, generator=g, dtype=torch.float64) * 3 - 20
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    estimate = torch.tensor(kl, dtype=torch.float64, requires_grad=True)
    out = kto_loss(policy, ref, desirable, estimate, beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    expected = _direct(policy.tolist(), ref.tolist(), desirable.tolist(), kl, 0.3, 1.5, 0.8)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(out.reference_point) == max(0.0, kl)
    assert out.rewards.tolist() == pytest.approx([0.3 * (p - r) for p, r in zip(policy.tolist(), ref.tolist())])
    out.losses.mean().backward()
    assert estimate.grad is None  # z_ref is detached
    # d/dr of λ(1 − σ(β(±r ∓ z))) = ∓λβσ(1 − σ)
    z = max(0.0, kl)
    for i, (p, r, d) in enumerate(zip(policy.tolist(), ref.tolist(), desirable.tolist())):
        s = 1 / (1 + math.exp(-0.3 * ((p - r) - z if d else z - (p - r))))
        slope = (1.5 if d else 0.8) * 0.3 * s * (1 - s) / 7
        assert float(policy.grad[i]) == pytest.approx(-slope if d else slope, rel=1e-9)


def _unpaired():
    pairs = make_preference_pairs(4, seed=5)
    rows = []
    for k, p in enumerate(pairs):  # unbalanced on purpose: 3 desirable, 5 undesirable
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
        rows.append({"prompt": p["prompt"], "completion": p["chosen"] if k < 3 else p["rejected"] + " Sure.",
                     "label": k < 3})
    return rows


def _trl_loss_and_grads(model, ref, tokenizer, records, tmp_path):
    import trl
    from datasets import Dataset

    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, desirable_weight=1.3, undesirable_weight=0.9,
                         per_device_train_batch_size=len(records) * 2, report_to="none", use_cpu=True, max_length=None,
                         bf16=False)
    trainer = trl.KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer)
    ds = trainer.train_dataset
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(len(ds))]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    kl = trainer._metrics["train"]["kl"][-1]
    return loss.detach(), kl, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _alignkit_loss_and_grads(model, ref, tokenizer, records, tmp_path, layout):
    args = KTOConfig(output_dir=str(tmp_path / f"ak-{layout}"), beta=0.1, desirable_weight=1.3, undesirable_weight=0.9,
                     per_device_train_batch_size=2, report_to="none", use_cpu=True, max_length=None,
                     score_layout=layout)
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=records, processing_class=tokenizer)
    ds = trainer.train_dataset
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(len(ds))]))  # TRL's order
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    kl = trainer._metrics["train"]["kl"][-1]
    return loss.detach(), kl, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("data, layout", [("unpaired", "padded"), ("unpaired", "auto"), ("preference", "shared_prompt")])
def test_loss_and_grads_equal_trl(tiny_model_path, tokenizer, tmp_path, data, layout):
    from alignkit.trainers.sft import finetune

    torch.manual_seed(0)
    base = load_tiny(tiny_model_path)
    if data == "unpaired":
        records = _unpaired()
    else:
        records = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in make_preference_pairs(4, seed=6)]
    # a policy fine-tuned a little on other answers of the task: it likes such answers under any prompt, so the
    # log-ratios of mismatched pairs (the KL estimate) are positive and the reference point is not clamped to 0
    policy = copy.deepcopy(base)
    sft = [{"prompt": p["prompt"], "response": p["chosen"]} for p in make_preference_pairs(16, seed=9)]
    finetune(policy, tokenizer, sft, str(tmp_path / "sft"), max_steps=4, batch_size=8, learning_rate=3e-3,
             use_cpu=True)
    trl_loss, trl_kl, trl_grads = _trl_loss_and_grads(copy.deepcopy(policy), copy.deepcopy(base), tokenizer, records,
                                                      tmp_path)
    ak_loss, ak_kl, ak_grads = _alignkit_loss_and_grads(copy.deepcopy(policy), copy.deepcopy(base), tokenizer, records,
                                                        tmp_path, layout)
    assert trl_kl > 1e-3, "the KL reference point is 0: the test would not check it"
    assert ak_kl == pytest.approx(trl_kl, abs=1e-5)
    torch.testing.assert_close(ak_loss, trl_loss, atol=1e-6, rtol=0)
    assert set(ak_grads) == set(trl_grads) and len(ak_grads) > 0
    for name in trl_grads:
        torch.testing.assert_close(ak_grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=5e-3, report_to="none",
                use_cpu=True, max_length=128, logging_steps=1, seed=0, save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return KTOConfig(**base)


def test_reads_three_record_kinds(tiny_model_path, tokenizer, tmp_path):
    pairs = make_preference_pairs(3, seed=1)
    kinds = {
        "unpaired": [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs],
        "preference": pairs,
        "negatives": [{"prompt": p["prompt"], "rejected": p["rejected"]} for p in pairs],
    }
    labels = {}
    for name, records in kinds.items():
        trainer = KTOTrainer(load_tiny(tiny_model_path), _config(tmp_path), train_dataset=records,
                             processing_class=tokenizer)
        labels[name] = trainer.train_dataset["label"]
        assert all(len(r) == 1 for r in trainer.train_dataset["response_ids"])
    assert labels == {"unpaired": [1.0] * 3, "preference": [1.0] * 3 + [0.0] * 3, "negatives": [0.0] * 3}
    with pytest.raises(RecordError, match=r"row 2, field 'label': expected true or false"):
        KTOTrainer(load_tiny(tiny_model_path), _config(tmp_path), processing_class=tokenizer,
                   train_dataset=kinds["unpaired"][:1] + [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(ValueError, match="per_device_train_batch_size must be >= 2"):
        _config(tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="live reference"):
        _config(tmp_path, reference="precomputed")


def test_negatives_only_training_logs_each_term_and_pushes_them_down(tiny_model_path, tokenizer, tmp_path):
    negatives = [{"prompt": p["prompt"], "rejected": p["rejected"]} for p in make_preference_pairs(8, seed=2)]
    trainer = KTOTrainer(load_tiny(tiny_model_path), _config(tmp_path, max_steps=10), train_dataset=negatives,
                         processing_class=tokenizer)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    with torch.no_grad():
        before = trainer.score(trainer.model, batch["completions"]).logps
    trainer.train()
    with torch.no_grad():
        after = trainer.score(trainer.model.eval(), batch["completions"]).logps
    logs = [h for h in trainer.state.log_history if "loss/kto" in h]
    for key in ("loss", "loss/kto", "kl", "rewards/rejected", "logps/rejected"):
        assert key in logs[0], key
    assert "rewards/chosen" not in logs[0]  # no desirable example: the term is left out, not logged as 0
    assert logs[0]["loss/kto"] == pytest.approx(0.5, abs=1e-4)  # policy = reference: 1 − σ(0)
    assert logs[-1]["rewards/rejected"] < logs[0]["rewards/rejected"] - 0.05
    assert (after - before).mean() < -0.5  # the undesirable responses lost probability


def test_recipe_runs(tmp_path):
    from alignkit.recipes import parse_recipe, run_recipe

    recipe = parse_recipe(os.path.join(REPO, "recipes", "kto_tiny.yaml"),
                          ["--output_dir", str(tmp_path / "kto"), "--max_steps", "2", "--synthetic_train_size", "16",
                           "--eval_strategy", "no", "--save_strategy", "no"])
    assert recipe.method == "kto" and isinstance(recipe.config, KTOConfig)
    trainer = run_recipe(*recipe)
    assert trainer.state.global_step == 2 and (tmp_path / "kto" / "model.safetensors").exists()
    lora = parse_recipe(os.path.join(REPO, "recipes", "kto_smollm2.yaml"), ["--bf16", "false"])
    assert lora.method == "kto" and lora.model_args.use_peft and lora.config.reference == "adapter"
