"""NPOTrainer: every loss type trains and logs its terms; the reference is the starting model (frozen
copy, LoRA adapter off, or precomputed and cached); SimNPO / GA build no reference; forget/retain
batching covers the retain set deterministically; clear errors for a missing, empty or malformed
retain/forget set; checkpoint + crash + ``resume_from_checkpoint auto`` equals an uninterrupted run."""

import json
import math
import os

import pytest
import torch
from conftest import Crash, crash_after_save, load_tiny
from peft import LoraConfig
from safetensors.torch import load_file

from alignkit.data.forget_retain import ForgetRetainSampler
from alignkit.data.records import RecordError
from alignkit.losses import UNLEARNING_LOSS_TYPES
from alignkit.scoring import score_responses
from alignkit.tasks import synthetic_tofu as st
from alignkit.trainers import NPOConfig, NPOTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORGET = st.records("forget10")[:8]
RETAIN = st.records("retain90")[:12]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=1e-2, report_to="none", use_cpu=True, max_length=64, logging_steps=1, seed=0,
                save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return NPOConfig(**base)


@pytest.mark.parametrize("loss_type", ["npo", "npo_rt", "npo_kl", "simnpo", "ga", "ga_rt"])
def test_each_loss_type_logs_its_terms_and_forgets(tiny_model_path, tokenizer, tmp_path, loss_type):
    trainer = NPOTrainer(load_tiny(tiny_model_path), _config(tmp_path, loss_type=loss_type, max_steps=4),
                         train_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer)
    forget_term, retain_term = UNLEARNING_LOSS_TYPES[loss_type]
    assert trainer.reference_mode == ("model" if loss_type.startswith("npo") else "none")
    assert (trainer.ref_model is None) == (trainer.reference_mode == "none")  # no copy for SimNPO / GA
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss/forget" in h]
    expected = {"loss", "loss/forget", "logps/forget", "logps/forget_per_token"}
    if forget_term == "npo":
        expected |= {"logratio/forget", "weights/forget"}
        # first step: the policy is the reference, r = 0, so L_NPO = 2·ln2/β and the weight 2·σ(0) = 1
        assert logs[0]["loss/forget"] == pytest.approx(2 * math.log(2) / 0.1, rel=1e-5)
        assert logs[0]["weights/forget"] == pytest.approx(1.0) and logs[-1]["weights/forget"] < 1.0
    if retain_term:
        expected |= {"loss/retain", "nll/retain"}
    if retain_term == "kl":
        expected.add("kl/retain")
        assert logs[0]["kl/retain"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl/retain"] > 0
    assert expected <= set(logs[0]), expected - set(logs[0])
    if not retain_term:
        assert not {"loss/retain", "nll/retain"} & set(logs[0])
    assert logs[-1]["logps/forget"] < logs[0]["logps/forget"] - 1.0, "the forget responses did not become less likely"


def test_lora_reference_is_the_starting_model_with_the_adapter_off(tiny_model_path, tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = NPOTrainer(load_tiny(tiny_model_path), _config(tmp_path, loss_type="npo_kl", max_steps=3),
                         train_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer, peft_config=lora)
    assert trainer.reference_mode == "adapter" and trainer.ref_model is None
    trainer.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        base = score_responses(load_tiny(tiny_model_path), batch["forget"]).logps
        policy = score_responses(trainer.model, batch["forget"]).logps
    torch.testing.assert_close(trainer.reference_logps(trainer.model, batch["forget"]), base, atol=1e-4, rtol=0)
    assert (policy - base).abs().max() > 1e-3


def test_precomputed_reference_equals_live_and_is_cached(tiny_model_path, tokenizer, tmp_path, monkeypatch):
    live = NPOTrainer(load_tiny(tiny_model_path), _config(tmp_path, loss_type="npo_rt", reference="model"),
                      train_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer)
    pre_config = dict(loss_type="npo_rt", reference="precomputed", max_steps=2)
    pre = NPOTrainer(load_tiny(tiny_model_path), _config(tmp_path, **pre_config),
                     train_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer)
    pre.get_train_dataloader()
    assert pre.ref_model is None and os.listdir(tmp_path / "out" / "ref_logps")
    batch = pre.data_collator([pre.train_dataset[i] for i in range(4)])
    live_batch = live.data_collator([live.train_dataset[i] for i in range(4)])
    assert "ref_logps" in batch["forget"] and "ref_logps" not in batch["retain"]
    torch.testing.assert_close(batch["forget"]["ref_logps"], live.reference_logps(live.model, live_batch["forget"]),
                               atol=1e-4, rtol=0)
    monkeypatch.setattr(NPOTrainer, "_compute_reference_logps", lambda self, *a: pytest.fail("recomputed"))
    again = NPOTrainer(load_tiny(tiny_model_path), _config(tmp_path, **pre_config),
                       train_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer)
    again.train()
    first = next(h for h in again.state.log_history if "loss/forget" in h)
    assert first["loss/forget"] == pytest.approx(2 * math.log(2) / 0.1, rel=1e-4)
    with pytest.raises(ValueError, match="precomputed"):
        _config(tmp_path, loss_type="npo_kl", reference="precomputed")


def test_forget_retain_batches_cover_the_retain_set_deterministically(tiny_model_path, tokenizer, tmp_path):
    sampler = ForgetRetainSampler(5, 12, seed=3)
    draws, orders = [], []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert sorted(f for f, _ in pairs) == list(range(5))
        orders.append([f for f, _ in pairs])
        draws += [r for _, r in pairs]
    counts = [draws.count(r) for r in range(12)]
    assert min(counts) >= 2 and max(counts) <= 3  # 30 draws spread evenly over 12 retain examples
    assert len({tuple(o) for o in orders}) > 1  # reshuffled each epoch
    again = ForgetRetainSampler(5, 12, seed=3)
    again.set_epoch(4)
    sampler.set_epoch(4)
    assert list(again) == list(sampler)  # a pure function of (seed, epoch): resume and every process agree

    trainer = NPOTrainer(load_tiny(tiny_model_path), _config(tmp_path, loss_type="ga_rt"), train_dataset=FORGET,
                         retain_dataset=RETAIN, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"forget", "retain"} and batch["forget"]["response_lengths"].numel() == 4
    assert batch["retain"]["response_lengths"].numel() == 4


def test_missing_empty_or_malformed_sets_are_clear_errors(tiny_model_path, tokenizer, tmp_path):
    model = load_tiny(tiny_model_path)
    with pytest.raises(ValueError, match=r"loss_type='npo_rt' adds a retain term .* no retain set was given"):
        NPOTrainer(model, _config(tmp_path, loss_type="npo_rt"), train_dataset=FORGET, processing_class=tokenizer)
    with pytest.raises(RecordError, match=r"retain set has no records, but loss_type='npo_rt'"):
        NPOTrainer(model, _config(tmp_path, loss_type="npo_rt"), train_dataset=FORGET, retain_dataset=[],
                   processing_class=tokenizer)
    empty = tmp_path / "retain.jsonl"
    empty.write_text("\n")
    with pytest.raises(RecordError, match=r"retain.jsonl: the retain set has no records, but loss_type='npo_rt'"):
        NPOTrainer(model, _config(tmp_path, loss_type="npo_rt"), train_dataset=FORGET, retain_dataset=str(empty),
                   processing_class=tokenizer)

    bad_retain = tmp_path / "bad_retain.jsonl"
    bad_retain.write_text(json.dumps(RETAIN[0]) + "\n" + json.dumps({"prompt": "Who?", "reply": "x"}) + "\n")
    with pytest.raises(RecordError, match=r"bad_retain.jsonl, row 2, field 'response'"):
        NPOTrainer(model, _config(tmp_path, loss_type="npo_rt"), train_dataset=FORGET, retain_dataset=str(bad_retain),
                   processing_class=tokenizer)
    bad_forget = tmp_path / "forget.jsonl"
    bad_forget.write_text(json.dumps(FORGET[0]) + "\n" + json.dumps({"prompt": "Who?", "response": "  "}) + "\n")
    with pytest.raises(RecordError, match=r"forget.jsonl, row 2, field 'response'"):
        NPOTrainer(model, _config(tmp_path, loss_type="simnpo"), train_dataset=str(bad_forget),
                   processing_class=tokenizer)


def test_crash_and_resume_gives_the_same_weights(tmp_path, monkeypatch):
    """The recipe path in-process: an uninterrupted run vs one that dies right after its step-6 checkpoint
    (mid second epoch: 20 forget records, batch 4) and is resumed with ``resume_from_checkpoint auto``."""

    import alignkit.recipes as recipes

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    args = ["--model_name_or_path", "tiny:qwen2", "--max_steps", "9", "--save_steps", "3", "--logging_steps", "1",
            "--learning_rate", "5e-3", "--disable_tqdm", "true"]

    def run(out, *extra):
        return recipes.run_recipe(*recipes.parse_recipe(os.path.join(REPO, "recipes", "npo_tiny.yaml"),
                                                        [*args, "--output_dir", str(out), *extra]))

    run(tmp_path / "full")

    original = recipes.method_classes

    def with_crash(method):
        config_cls, trainer_cls = original(method)

        class Crashing(trainer_cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(crash_after_save(6))

        return config_cls, Crashing

    monkeypatch.setattr(recipes, "method_classes", with_crash)
    with pytest.raises(Crash):
        run(tmp_path / "resumed")
    monkeypatch.setattr(recipes, "method_classes", original)
    # (the killed run's lock file, hidden, stays behind until the resume takes it over)
    assert sorted(n for n in os.listdir(tmp_path / "resumed") if not n.startswith(".")) == ["checkpoint-3", "checkpoint-6"]
    start = load_file(tmp_path / "resumed" / "checkpoint-6" / "model.safetensors")

    run(tmp_path / "resumed", "--resume_from_checkpoint", "auto")
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["global_step"] == 9 and min(h["step"] for h in state["log_history"] if "loss" in h) == 1
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a), "training after the checkpoint did not move the weights"
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow
def test_two_process_run_agrees_with_one_process(tmp_path):
    """`accelerate launch` with 2 CPU processes x 4 examples == 1 process x 8: the forget/retain sampler
    is the same on every process and each keeps its shard of every batch."""
    import subprocess
    import sys

    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # 2 steps of 8 forget examples (of 20): full batches, so the shards hold exactly the 1-process batch
    common = ["recipes/npo_tiny.yaml", "--model_name_or_path", "tiny:qwen2", "--max_steps", "2",
              "--save_strategy", "no", "--learning_rate", "5e-3", "--logging_steps", "1", "--disable_tqdm", "true"]

    def run(*cmd):
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    run(sys.executable, "-m", "alignkit", "train", *common, "--per_device_train_batch_size", "8",
        "--output_dir", str(tmp_path / "one"))
    run(sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
        "-m", "alignkit", "train", *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two"))
    log = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    assert log[0]["epoch"] == pytest.approx(1 / 3)  # ceil(20 / (2 processes x 4)) = 3 steps per epoch
    assert "loss/retain" in log[0]
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(tmp_path / "cache" / "tiny" / "qwen2" / "model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
