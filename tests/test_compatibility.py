"""The MUSCLE-style compatibility term: the KL term equals a direct per-token re-computation from two full
forwards; the total loss is method loss + λ·term; λ = 0 changes neither the loss nor the number of models;
π_old is the live reference, the adapter-off base, or one frozen copy; compat batches are a pure function of
the step (a crash + resume gives the weights of an uninterrupted run); ``compat_records`` keeps what the
old model got right."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import Crash, crash_after_save, load_tiny
from fakes import LastNumberVerifier, ScriptedEngine
from peft import LoraConfig
from safetensors.torch import load_file

import alignkit.trainers.base as base
from alignkit.compatibility import CompatArguments, CompatibilityTerm, CompatStream, compat_batch_indices, compat_records
from alignkit.data.collate import GroupCollator
from alignkit.data.tokenize import tokenize_group
from alignkit.tasks.arithmetic import make_preference_pairs, make_problems
from alignkit.trainers import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from alignkit.trainers.sft import sft_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = sft_records(make_problems(16, seed=2))
COMPAT = sft_records(make_problems(7, seed=5))


def _term(weight=1.0, records=COMPAT, **kw):
    return [CompatibilityTerm(records, weight=weight, **kw)] if weight else []


def _config(tmp_path, cls=SFTConfig, **kw):
    base_kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3,
                   report_to="none", use_cpu=True, max_length=128, logging_steps=1, seed=0, save_strategy="no",
                   disable_tqdm=True)
    base_kw.update(kw)
    return cls(**base_kw)


def _perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _direct_kl(policy, old, tokenizer, records, token_mask=False):
    """Per record: one full forward of prompt + response through each model, full next-token
    distributions at the positions predicting response tokens, KL(old ‖ policy) per token; mean over tokens."""
    kls = []
    for r in records:
        g = tokenize_group(tokenizer, r["prompt"], [r["response"]], max_length=128)
        ids = torch.tensor([g["prompt_ids"] + g["response_ids"][0]])
        n_prompt, n_resp = len(g["prompt_ids"]), len(g["response_ids"][0])
        rows = slice(n_prompt - 1, n_prompt - 1 + n_resp)
        with torch.no_grad():
            p_logits = policy(input_ids=ids).logits[0, rows].double()
            o_logits = old(input_ids=ids).logits[0, rows].double()
        p_log, o_log = F.log_softmax(p_logits, -1), F.log_softmax(o_logits, -1)
        for t in range(n_resp):
            if token_mask and int(o_logits[t].argmax()) != g["response_ids"][0][t]:
                continue
            kls.append(float((o_log[t].exp() * (o_log[t] - p_log[t])).sum()))
    return sum(kls) / len(kls), len(kls)


@pytest.mark.parametrize("mask", ["all", "token"])
def test_compat_term_equals_direct_recomputation(tiny_model_path, tokenizer, tmp_path, mask):
    start = load_tiny(tiny_model_path)
    if mask == "token":  # a starting model that predicts some response tokens greedily
        SFTTrainer(model=start, args=_config(tmp_path, max_steps=25, learning_rate=1e-2, per_device_train_batch_size=7),
                   train_dataset=COMPAT, processing_class=tokenizer).train()
        start.eval()
    model = copy.deepcopy(start)
    compat = CompatibilityTerm(COMPAT, weight=0.7, batch_size=5, mask=mask)
    trainer = SFTTrainer(model=model, args=_config(tmp_path), train_dataset=TRAIN, processing_class=tokenizer,
                         aux_losses=[compat])
    assert compat.source == "copy" and compat.old_model is not None
    _perturb(model, scale=0.05 if mask == "all" else 0.01)  # the policy moved away from the starting model; the frozen copy did not
    trainer.state.global_step = 3
    index = 3 * trainer.args.gradient_accumulation_steps
    records = [COMPAT[i] for i in compat.stream.indices(index)]
    assert len(records) == 5
    term = compat(trainer, model).detach()
    expected, tokens = _direct_kl(model, start, tokenizer, records, token_mask=mask == "token")
    assert tokens > 10 and expected > 1e-4
    if mask == "token":
        assert tokens < sum(len(tokenize_group(tokenizer, r["prompt"], [r["response"]])["response_ids"][0]) for r in records)
    assert float(term) == pytest.approx(expected, rel=1e-4, abs=1e-6)

    # total loss = method loss + λ·term, and loss/compat is logged separately
    batch = GroupCollator(tokenizer.pad_token_id, "shared_prompt")(
        [tokenize_group(tokenizer, r["prompt"], [r["response"]], max_length=128) for r in TRAIN[:4]])
    method_loss, _ = trainer.compute_batch_loss(model, batch)
    trainer.state.global_step = 3
    compat._step = (-1, -1)
    model.train()
    total = trainer.compute_loss(model, batch)
    assert float(total.detach()) == pytest.approx(float(method_loss.detach()) + 0.7 * expected, rel=1e-4)
    assert trainer._metrics["train"]["loss/compat"][-1] == pytest.approx(expected, rel=1e-4)


def test_compat_weight_zero_leaves_loss_and_models_unchanged(tiny_model_path, tokenizer, tmp_path, monkeypatch):
    copies = []
    real_deepcopy = copy.deepcopy

    def counting(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            copies.append(type(obj).__name__)
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(base.copy, "deepcopy", counting)
    pairs = make_preference_pairs(4, seed=1)
    batch = None
    losses = {}
    for name in ("plain", "zero"):  # λ = 0 attaches no term (the recipe layer and CompatArguments.term)
        copies.clear()
        model = load_tiny(tiny_model_path)
        aux = CompatArguments(compat_weight=0.0).term(COMPAT if name == "zero" else None)
        assert aux is None
        trainer = SFTTrainer(model=model, args=_config(tmp_path), train_dataset=TRAIN, processing_class=tokenizer,
                             aux_losses=_term(0.0))
        assert copies == [] and trainer.ref_model is None and trainer.aux_losses == []
        batch = batch or GroupCollator(tokenizer.pad_token_id, "shared_prompt")(
            [tokenize_group(tokenizer, r["prompt"], [r["response"]]) for r in TRAIN[:4]])
        model.train()
        losses[name] = float(trainer.compute_loss(model, batch))
        assert "loss/compat" not in trainer._metrics["train"]
    assert losses["zero"] == losses["plain"]

    # DPO with a frozen reference: λ = 0 -> one copy (the reference); λ > 0 -> still one, π_old is the reference
    for weight in (0.0, 0.5):
        copies.clear()
        aux = _term(weight)
        trainer = DPOTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path, DPOConfig),
                             train_dataset=pairs, processing_class=tokenizer, aux_losses=aux)
        assert len(copies) == 1 and all(t.old_model is None and t.source == "reference" for t in aux)
    # SFT: λ > 0 makes exactly one frozen copy; with LoRA none (the adapter-off base is the old model)
    copies.clear()
    SFTTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path), train_dataset=TRAIN,
               processing_class=tokenizer, aux_losses=_term(1.0))
    assert len(copies) == 1
    copies.clear()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    compat = CompatibilityTerm(COMPAT, weight=1.0)
    trainer = SFTTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path), train_dataset=TRAIN,
                         processing_class=tokenizer, aux_losses=[compat], peft_config=lora)
    assert copies == [] and compat.source == "adapter" and compat.old_model is None
    trainer.state.global_step = 0
    assert float(compat(trainer, trainer.model)) == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity


def test_compat_batches_are_a_pure_function_of_the_step():
    a = [compat_batch_indices(k, 3, 7, seed=11) for k in range(7)]
    assert a == [compat_batch_indices(k, 3, 7, seed=11) for k in range(7)]
    flat = [i for batch in a for i in batch]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))  # each pass: a permutation
    assert flat[:7] != flat[7:14]  # reshuffled per pass
    # two processes take disjoint slices of the same stream positions as one process with twice the batch
    one = compat_batch_indices(2, 6, 7, seed=11)
    assert compat_batch_indices(2, 3, 7, seed=11, rank=0, world_size=2) + \
        compat_batch_indices(2, 3, 7, seed=11, rank=1, world_size=2) == one


def test_crash_and_resume_gives_the_same_weights(tiny_model_path, tokenizer, tmp_path):
    """λ > 0, gradient accumulation 2: a run that dies after its step-3 checkpoint and is resumed ends with the
    weights of an uninterrupted 6-step run."""

    def run(out, callbacks=(), resume=None):
        config = _config(tmp_path, output_dir=str(out), max_steps=6, save_strategy="steps", save_steps=3,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2)
        trainer = SFTTrainer(model=load_tiny(tiny_model_path), args=config, train_dataset=TRAIN,
                             processing_class=tokenizer, aux_losses=_term(2.0, batch_size=3), callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    compat_logs = [h["loss/compat"] for h in full.state.log_history if "loss/compat" in h]
    assert len(compat_logs) == 6 and compat_logs[0] == 0.0 and max(compat_logs) > 1e-3
    with pytest.raises(Crash):
        run(tmp_path / "resumed", [crash_after_save(3)])
    middle = load_file(tmp_path / "resumed" / "checkpoint-3" / "model.safetensors")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    a = {k: v.detach() for k, v in full.model.state_dict().items()}
    b = {k: v.detach() for k, v in resumed.model.state_dict().items()}
    assert any((a[k] - middle[k]).abs().max() > 1e-4 for k in middle)
    for k in middle:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    resumed_logs = [h["loss/compat"] for h in resumed.state.log_history if "loss/compat" in h and h["step"] > 3]
    assert resumed_logs == pytest.approx(compat_logs[3:], abs=1e-6)


def test_compat_stream_uses_every_record(tokenizer):
    groups = [tokenize_group(tokenizer, r["prompt"], [r["response"]]) for r in COMPAT]
    stream = CompatStream(groups, GroupCollator(tokenizer.pad_token_id, "shared_prompt"), batch_size=7, seed=0)
    assert sorted(stream.indices(0)) == list(range(7))  # one batch of the set's size: every record once
    batch = stream.batch(0)
    expected = [len(groups[i]["response_ids"][0]) for i in stream.indices(0)]
    assert batch["response_lengths"].tolist() == expected


def test_compat_records_keep_what_the_old_model_got_right():
    problems = [{"prompt": "p1", "answer": "3", "solution": "1 + 2 = 3"}, {"prompt": "p2", "answer": "5"},
                {"prompt": "p3", "answer": "7", "solution": "gold 7"}]
    engine = ScriptedEngine({"p1": ["it is 3", "maybe 4", "it is 3"], "p2": ["6"], "p3": ["so 7", "or 7 again"]})
    records, rows = compat_records(engine, LastNumberVerifier(), problems, n=3, per_prompt=2, return_rows=True)
    assert records == [{"prompt": "p1", "response": "it is 3", "answer": "3"},
                       {"prompt": "p3", "response": "so 7", "answer": "7"},
                       {"prompt": "p3", "response": "or 7 again", "answer": "7"}]
    assert engine.calls[0][1] == 3
    gold = compat_records(engine, LastNumberVerifier(), [problems[0], problems[2]], response="gold")
    assert gold == [{"prompt": "p1", "response": "1 + 2 = 3", "answer": "3"}, {"prompt": "p3", "response": "gold 7", "answer": "7"}]
    default = ScriptedEngine({"p1": ["3"]})
    compat_records(default, LastNumberVerifier(), problems[:1])
    assert default.calls[0][1] == 1 and default.calls[0][2].greedy


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="compat_data"):
        CompatArguments(compat_weight=1.0).term(None)
    with pytest.raises(ValueError, match=r"compat_mask must be one of \('all', 'token'\)"):
        CompatArguments(compat_mask="tokens")
    with pytest.raises(ValueError, match="compat_weight must be >= 0"):
        CompatArguments(compat_weight=-1.0)
    with pytest.raises(ValueError, match="compat_batch_size must be >= 1"):
        CompatibilityTerm(COMPAT, batch_size=0)
    with pytest.raises(ValueError, match="response must be one of"):
        compat_records(ScriptedEngine({}), LastNumberVerifier(), [], response="mine")


def test_recipe_keys_attach_the_term(tmp_path):
    """The recipe keys compat_* still work: parsed into CompatArguments (not the method's config) and attached
    by the recipe layer as an auxiliary loss term, the records read with the recipe's data settings."""
    from alignkit.recipes import DataArguments, parse_recipe, plugins

    path = tmp_path / "compat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in COMPAT))
    recipe = parse_recipe(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "sft_tiny.yaml"), ["--compat_weight", "0.5", "--compat_data", str(path),
                                                    "--compat_mask", "token"])
    assert not hasattr(recipe.config, "compat_weight")
    assert recipe.compat_args.compat_weight == 0.5 and recipe.compat_args.compat_mask == "token"
    attached = plugins(None, DataArguments(), recipe.compat_args, recipe.flip_guard_args)
    (term,) = attached["aux_losses"]
    assert isinstance(term, CompatibilityTerm) and term.weight == 0.5 and term.mask == "token"
    assert attached["callbacks"] == []
    assert plugins(None, DataArguments(), CompatArguments(), recipe.flip_guard_args) == {"aux_losses": [], "callbacks": []}
