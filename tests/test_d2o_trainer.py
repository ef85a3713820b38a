"""D2OTrainer: groups of K samples + the negative, sampling through the rollout engine with a disk cache
(reused, and missed when model / prompts / sampling change), instruction prefix only while sampling,
LoRA reference samples, refresh from the policy with exact resume, K = 1 equals DPO, logged terms."""

import json
import os
import shutil

import pytest
import torch
from conftest import load_tiny
from peft import LoraConfig, get_peft_model

from alignkit.recipes import parse_recipe, resolve_resume
from alignkit.reference_samples import weights_digest, with_instruction_prefix
from alignkit.rollout.arguments import RolloutArguments
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.hf import HFEngine
from alignkit.trainers.d2o import D2OConfig, D2OTrainer
from alignkit.trainers.dpo import DPOConfig, DPOTrainer
from tests.test_rollout_vllm import fake_vllm, launcher_env  # noqa: F401  (fixtures: a fake vllm package)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3
ROLLOUT = dict(rollout_max_new_tokens=6, rollout_batch_size=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingEngine:
    """Wraps an engine; records every generate call (prompts, n, sampling) and every weight sync."""

    def __init__(self, inner):
        self.inner, self.calls, self.synced = inner, [], []

    def generate(self, prompts, n=1, sampling=None):
        self.calls.append((list(prompts), n, sampling))
        return self.inner.generate(prompts, n, sampling)

    def sync_weights(self, model):
        self.synced.append(model)
        self.inner.sync_weights(model)


class FailingEngine:
    def generate(self, *a, **k):
        raise AssertionError("sampled although every record has its samples")

    def sync_weights(self, model):
        pass


def _records(n=4, prefix="Start with"):
    return [{"prompt": f"{prefix} {i}. Add 2. What is the result?", "rejected": f"The answer is {i + 5}."}
            for i in range(n)]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                learning_rate=5e-3, report_to="none", use_cpu=True, max_length=96, logging_steps=1, seed=0,
                save_strategy="no", num_samples=K, disable_tqdm=True)
    base.update(kw)
    return D2OConfig(**base)


def _trainer(tmp_path, tokenizer, model, records=None, engine=None, rollout=None, **config):
    args = _config(tmp_path, **config)
    engine = engine if engine is not None else CountingEngine(HFEngine(model, tokenizer, progress=False))
    trainer = D2OTrainer(model=model, args=args, train_dataset=records or _records(), processing_class=tokenizer,
                         rollout_args=RolloutArguments(**{**ROLLOUT, **(rollout or {})}), rollout_engine=engine)
    return trainer, engine


def test_groups_are_k_samples_then_the_negative_and_training_moves_the_loss(tiny_model_path, tokenizer, tmp_path):
    records = _records(4)
    trainer, engine = _trainer(tmp_path, tokenizer, load_tiny(tiny_model_path), records, max_steps=12,
                               learning_rate=2e-3)
    assert len(engine.calls) == 1 and engine.calls[0][1] == K and len(engine.calls[0][0]) == 4
    row = trainer.train_dataset[0]
    assert len(row["response_ids"]) == K + 1
    rejected_ids = tokenizer(records[0]["prompt"] + records[0]["rejected"] + tokenizer.eos_token)["input_ids"]
    assert rejected_ids[-len(row["response_ids"][-1]):] == row["response_ids"][-1]
    cached = [json.loads(line) for line in next((tmp_path / "out" / "d2o_samples").glob("train-*.jsonl")).open()]
    assert [c["prompt"] for c in cached] == [r["prompt"] for r in records] and all(len(c["samples"]) == K for c in cached)

    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss/d2o" in h]
    for key in ("loss", "loss/d2o", "rewards/positive", "rewards/negative", "rewards/margins", "rewards/accuracies",
                "logratio/samples", "logratio/rejected", "logps/samples", "logps/rejected"):
        assert key in logs[0], key
    assert logs[0]["loss/d2o"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert logs[-1]["loss/d2o"] < logs[0]["loss/d2o"] - 0.05
    assert logs[-1]["rewards/margins"] > 0 and logs[-1]["logratio/rejected"] < 0
    assert logs[-1]["rewards/margins"] == pytest.approx(logs[-1]["rewards/positive"] - logs[-1]["rewards/negative"], abs=1e-5)


def test_sample_cache_is_reused_and_missed_on_any_input_change(tiny_model_path, tokenizer, tmp_path):
    def calls(records=None, model=None, rollout=None, **config):
        model = model if model is not None else load_tiny(tiny_model_path)
        trainer, engine = _trainer(tmp_path, tokenizer, model, records, rollout=rollout, **config)
        return len(engine.calls), trainer

    assert calls()[0] == 1
    again, trainer = calls()
    assert again == 0, "a second run with the same inputs sampled again"
    first = trainer.train_dataset[0]["response_ids"]

    changed = load_tiny(tiny_model_path)
    with torch.no_grad():
        changed.model.norm.weight.add_(0.01)
    assert calls(model=changed)[0] == 1, "other weights must miss the cache"
    assert calls(records=_records(4, prefix="Begin with"))[0] == 1, "other prompts must miss the cache"
    assert calls(records=_records(3))[0] == 1, "fewer prompts must miss the cache"
    assert calls(rollout={"rollout_temperature": 0.7})[0] == 1, "another temperature must miss the cache"
    assert calls(rollout={"rollout_max_new_tokens": 5})[0] == 1, "another length limit must miss the cache"
    assert calls(rollout={"rollout_seed": 7})[0] == 1, "another seed must miss the cache"
    assert calls(num_samples=K + 1)[0] == 1, "another K must miss the cache"
    assert calls(instruction_prefix="Be brief. ")[0] == 1, "another instruction prefix must miss the cache"
    again, trainer = calls()
    assert again == 0 and trainer.train_dataset[0]["response_ids"] == first


def test_records_with_samples_are_not_sampled(tiny_model_path, tokenizer, tmp_path):
    records = [{**r, "samples": [f"The answer is {j}." for j in range(K + 2)]} for r in _records(2)]
    trainer, _ = _trainer(tmp_path, tokenizer, load_tiny(tiny_model_path), records, engine=FailingEngine())
    group = trainer.train_dataset[0]["response_ids"]
    assert len(group) == K + 1  # the first K samples
    assert tokenizer.decode(group[0]).startswith("The answer is 0")
    with pytest.raises(ValueError, match=r"row 1, field 'samples': has 5 samples but num_samples=6"):
        _trainer(tmp_path, tokenizer, load_tiny(tiny_model_path), records, engine=FailingEngine(), num_samples=K + 3)


def test_instruction_prefix_is_used_for_sampling_only(tiny_model_path, tokenizer, tmp_path):
    records = _records(2)
    trainer, engine = _trainer(tmp_path, tokenizer, load_tiny(tiny_model_path), records,
                               instruction_prefix="Be careful. ")
    assert engine.calls[0][0] == ["Be careful. " + r["prompt"] for r in records]
    assert trainer.train_dataset[0]["prompt_ids"] == tokenizer(records[0]["prompt"])["input_ids"]


def test_chat_prefix_and_weights_digest(tiny_model_path):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert with_instruction_prefix(messages, "P ") == [{"role": "system", "content": "S"}, {"role": "user", "content": "P Q"}]
    assert messages[1]["content"] == "Q" and with_instruction_prefix("Q", None) == "Q"
    digest = weights_digest(load_tiny(tiny_model_path))
    assert weights_digest(_perturbed_lora(tiny_model_path)) == digest  # the reference of a LoRA run is its base
    changed = load_tiny(tiny_model_path)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3
    assert weights_digest(changed) != digest


def test_k1_alpha_equal_beta_gives_the_dpo_loss(tiny_model_path, tokenizer, tmp_path):
    records = [{**r, "samples": [f"It is {i}."]} for i, r in enumerate(_records(4))]
    d2o, _ = _trainer(tmp_path, tokenizer, load_tiny(tiny_model_path), records, engine=FailingEngine(), num_samples=1,
                      alpha=0.3, beta=0.3, learning_rate=1e-2, max_steps=2)
    d2o.train()  # move the policy away from the reference, then compare the two losses on the trained policy
    pairs = [{"prompt": r["prompt"], "chosen": r["samples"][0], "rejected": r["rejected"]} for r in records]
    dpo = DPOTrainer(model=d2o.model, ref_model=d2o.ref_model, args=DPOConfig(
        output_dir=str(tmp_path / "dpo"), beta=0.3, report_to="none", use_cpu=True, max_length=96),
        train_dataset=pairs, processing_class=tokenizer)
    d2o_batch = d2o.data_collator([d2o.train_dataset[i] for i in range(4)])
    dpo_batch = dpo.data_collator([dpo.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        d2o_loss, d2o_metrics = d2o.compute_batch_loss(d2o.model, d2o_batch)
        dpo_loss, dpo_metrics = dpo.compute_batch_loss(dpo.model, dpo_batch)
    assert abs(float(d2o_loss) - 0.6931) > 1e-3
    torch.testing.assert_close(d2o_loss, dpo_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(d2o_metrics["rewards/margins"], dpo_metrics["rewards/margins"], atol=1e-5, rtol=0)


def _perturbed_lora(tiny_model_path):
    model = get_peft_model(load_tiny(tiny_model_path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_lora_reference_samples_come_from_the_base_and_refresh_from_the_policy(tiny_model_path, tokenizer, tmp_path):
    records = _records(3)
    greedy = SamplingConfig(temperature=0, max_new_tokens=6, logprobs=False)

    def greedy_texts(model):
        return [[c.text for c in g] for g in HFEngine(model, tokenizer, progress=False).generate(
            [r["prompt"] for r in records], n=1, sampling=greedy)]

    model = _perturbed_lora(tiny_model_path)
    base_texts, adapted_texts = greedy_texts(load_tiny(tiny_model_path)), greedy_texts(model)
    assert base_texts != adapted_texts, "the adapter must change the greedy answers for this test to mean anything"
    trainer, _ = _trainer(tmp_path, tokenizer, model, records, num_samples=1, rollout={"rollout_temperature": 0},
                               samples_refresh_steps=1)
    assert trainer.reference_mode == "adapter" and trainer.ref_model is None

    def samples_of(dataset):
        return [[tokenizer.decode(ids, skip_special_tokens=True) for ids in dataset[i]["response_ids"][:1]]
                for i in range(len(records))]

    assert samples_of(trainer.train_dataset) == base_texts
    trainer.refresh_train_samples(step=1)
    assert samples_of(trainer.train_dataset) == adapted_texts
    assert (tmp_path / "out" / "d2o_refresh" / "step-1.jsonl").exists()


def test_refresh_resamples_from_the_policy_and_resume_continues_exactly(tiny_model_path, tokenizer, tmp_path):
    common = dict(max_steps=6, samples_refresh_steps=3, save_strategy="steps", save_steps=3, learning_rate=5e-3,
                  per_device_train_batch_size=2)
    full, engine = _trainer(tmp_path / "a", tokenizer, load_tiny(tiny_model_path), _records(4), **common)
    full.train()
    # the initial reference samples, then one refresh at step 3 (none at the last step)
    assert len(engine.calls) == 2 and engine.calls[1][2].seed == full.args.seed + 3
    assert engine.synced[-1] is full.accelerator.unwrap_model(full.model)
    assert full.samples_step == 3 and full.samples_version == 1
    ckpt = tmp_path / "a" / "out" / "checkpoint-3"
    assert json.loads((ckpt / "d2o_samples.json").read_text()) == {"samples_step": 3}
    assert (tmp_path / "a" / "out" / "d2o_refresh" / "step-3.jsonl").exists()

    # the state of a run that crashed after saving step 3; `--resume_from_checkpoint auto` finds checkpoint-3,
    # puts the step-3 samples back and trains steps 4-6 exactly like the uninterrupted run
    crashed = tmp_path / "b" / "out"
    shutil.copytree(tmp_path / "a" / "out", crashed, ignore=shutil.ignore_patterns("checkpoint-6"))
    resumed, engine2 = _trainer(tmp_path / "b", tokenizer, load_tiny(tiny_model_path), _records(4),
                                resume_from_checkpoint="auto", **common)
    assert engine2.calls == []  # initial samples from the cache
    assert resolve_resume(resumed.args) == str(crashed / "checkpoint-3")
    resumed.train(resume_from_checkpoint=resolve_resume(resumed.args))
    assert resumed.samples_step == 3 and resumed.state.global_step == 6 and engine2.calls == []
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)

    # without the step-3 samples file, the samples are drawn again from the checkpoint's weights (the step-3
    # policy, same seed), after they are loaded: the same samples, the same result
    lost = tmp_path / "c" / "out"
    shutil.copytree(crashed, lost)
    (lost / "d2o_refresh" / "step-3.jsonl").unlink()
    again, engine3 = _trainer(tmp_path / "c", tokenizer, load_tiny(tiny_model_path), _records(4), **common)
    again.train(resume_from_checkpoint=str(lost / "checkpoint-3"))
    assert len(engine3.calls) == 1 and engine3.calls[0][2].seed == full.args.seed + 3
    for (name, a), b in zip(full.model.named_parameters(), again.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    start = load_tiny(tiny_model_path)
    assert any((a - s).abs().max() > 1e-4 for a, s in zip(full.model.parameters(), start.parameters()))


def test_precomputed_reference_and_eval_metrics(tiny_model_path, tokenizer, tmp_path):
    records = _records(4)
    live, _ = _trainer(tmp_path / "live", tokenizer, load_tiny(tiny_model_path), records, reference="model")
    assert live.attach_samples(records[:2], "eval") is not None  # fills the eval cache the run below reads
    pre = D2OTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path / "live", reference="precomputed",
                     max_steps=2), train_dataset=records, eval_dataset=records[:2], processing_class=tokenizer,
                     rollout_args=RolloutArguments(**ROLLOUT), rollout_engine=FailingEngine())  # cache hits only
    pre.get_train_dataloader()
    assert pre.ref_model is None and "ref_logps" in pre.train_dataset.column_names
    batch = pre.data_collator([pre.train_dataset[i] for i in range(2)])
    live_batch = live.data_collator([live.train_dataset[i] for i in range(2)])
    torch.testing.assert_close(batch["ref_logps"], live.reference_logps(live.model, live_batch), atol=1e-4, rtol=0)
    pre.train()
    metrics = pre.evaluate()
    assert "eval_loss/d2o" in metrics and "eval_rewards/margins" in metrics
    with pytest.raises(ValueError, match="precomputed"):
        _config(tmp_path, reference="precomputed", samples_refresh_steps=2)


def test_recipe_parses_into_d2o_settings():
    method, config, _, data_args, rollout_args, *_ = parse_recipe(
        os.path.join(REPO, "recipes", "d2o_tiny.yaml"), ["--num_samples", "4"])
    assert method == "d2o" and isinstance(config, D2OConfig)
    assert config.num_samples == 4 and config.alpha == config.beta == 0.1
    assert rollout_args.rollout_backend == "hf" and rollout_args.rollout_max_new_tokens <= 32
    assert data_args.train_data == "synthetic:negative_class"


TWO_PROCESS_SCRIPT = """
import json, os, sys
import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from alignkit.modeling import make_tiny_model
from alignkit.rollout.arguments import RolloutArguments
from alignkit.trainers.d2o import D2OConfig, D2OTrainer

out = sys.argv[1]
state = PartialState()
path = make_tiny_model(os.path.join(out, "model"), "qwen2")
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
records = [{"prompt": f"Start with {i}. Add 2. What is the result?", "rejected": f"The answer is {i + 5}."}
           for i in range(5)]
args = D2OConfig(output_dir=os.path.join(out, "run"), max_steps=2, per_device_train_batch_size=1, num_samples=2,
                 learning_rate=5e-3, report_to="none", use_cpu=True, save_strategy="no", samples_refresh_steps=1,
                 disable_tqdm=True, max_length=64)
trainer = D2OTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer,
                     rollout_args=RolloutArguments(rollout_max_new_tokens=5))
initial = [trainer.train_dataset[i]["response_ids"] for i in range(5)]
trainer.train()
refreshed = [trainer.train_dataset[i]["response_ids"] for i in range(5)]
with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as f:
    json.dump({"initial": initial, "refreshed": refreshed, "samples_step": trainer.samples_step}, f)
"""


@pytest.mark.slow
def test_two_processes_shard_the_sampling_and_agree(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port: other runs on this machine may hold torchrun's default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "d2o_two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "accelerate_configs/cpu.yaml", "--main_process_port", str(port), str(script), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "the two processes train on different samples"
    assert ranks[0]["samples_step"] == 1 and ranks[0]["initial"] != ranks[0]["refreshed"]
    cached = [json.loads(line) for line in next((tmp_path / "run" / "d2o_samples").glob("train-*.jsonl")).open()]
    assert len(cached) == 5 and all(len(c["samples"]) == 2 for c in cached)  # 5 prompts split 3 + 2, gathered in order
    assert [c["prompt"] for c in cached] == [f"Start with {i}. Add 2. What is the result?" for i in range(5)]
    assert len((tmp_path / "run" / "d2o_refresh" / "step-1.jsonl").read_text().splitlines()) == 5


def test_vllm_backend_with_lora(fake_vllm, tiny_model_path, tokenizer, tmp_path):  # noqa: F811
    """CPU, fake vLLM: with LoRA the engine is built from the peft model (base + synced adapter); a just
    attached adapter is the identity, so its samples are the reference's; a trained one is refused."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = D2OTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path, max_steps=1), peft_config=lora,
                         train_dataset=_records(2), processing_class=tokenizer,
                         rollout_args=RolloutArguments(rollout_backend="vllm", rollout_max_new_tokens=12))
    llm = fake_vllm.LLM.instances[-1]
    assert llm.kwargs["enable_lora"] and llm.calls[-1]["lora_request"] is not None
    assert [p.n for p in llm.calls[-1]["params"]] == [K, K] and llm.calls[-1]["params"][0].max_tokens == 12
    first = tokenizer.decode(trainer.train_dataset[0]["response_ids"][0], skip_special_tokens=True)
    assert first.startswith("sample 0 of")
    trainer.train()
    with pytest.raises(ValueError, match="adapter is already trained"):
        D2OTrainer(model=_perturbed_lora(tiny_model_path), args=_config(tmp_path / "b"), train_dataset=_records(2),
                   processing_class=tokenizer, rollout_args=RolloutArguments(rollout_backend="vllm"))
