"""PerStepTrainer: first-pit DPO pairs (rejected = the exact prefix tokens through the pit), advantage
token weights by step, both modes train a real tiny model and log their terms, records built from
problems through the engine + verifier are cached (no re-sampling), checkpoint + resume equals an
uninterrupted run, malformed per-step records name file / row / field, the recipes parse."""

import json
import os

import pytest
import torch
from conftest import Crash, crash_after_save, load_tiny
from fakes import LastNumberVerifier
from safetensors.torch import load_file
from test_steps import PrefixEngine

from alignkit.data.records import RecordError
from alignkit.rollout.arguments import RolloutArguments
from alignkit.scoring import score_responses
from alignkit.trainers import PerStepConfig, PerStepTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P1 = "Start with 2. Add 3. Multiply by 2. What is the result?"
P2 = "Start with 4. Subtract 1. Add 5. What is the result?"
CHOSEN1 = "2 + 3 = 5\n5 * 2 = 10\nThe answer is 10."
CHOSEN2 = "4 - 1 = 3\n3 + 5 = 8\nThe answer is 8."


def _records():
    return [
        {"prompt": P1, "response": "2 + 3 = 5\n5 * 2 = 12\nThe answer is 12.", "values": [0.5, 0.75, 0.0, 0.0],
         "chosen": CHOSEN1},
        {"prompt": P1, "response": "2 + 3 = 6\n6 * 2 = 12\nThe answer is 12.", "values": [0.5, 0.0, 0.0, 0.0],
         "chosen": CHOSEN1},
        {"prompt": P2, "response": "4 - 1 = 3\n3 + 5 = 9\nThe answer is 9.", "values": [0.25, 0.5, 0.0, 0.0],
         "chosen": CHOSEN2, "steps": ["4 - 1 = 3\n", "3 + 5 = 9\n", "The answer is 9."]},
        {"prompt": P2, "response": "4 - 1 = 2\n2 + 5 = 7\nThe answer is 7.", "values": [0.0, 0.0, 0.0, 0.0],
         "chosen": CHOSEN2},  # no drop: no pit
    ]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=5e-3, report_to="none",
                use_cpu=True, max_length=128, logging_steps=1, seed=0, save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return PerStepConfig(**base)


def test_first_pit_pairs_reject_the_exact_prefix_through_the_pit(tiny_model_path, tokenizer, tmp_path):
    trainer = PerStepTrainer(load_tiny(tiny_model_path), _config(tmp_path), train_dataset=_records(),
                             processing_class=tokenizer)
    ds = trainer.train_dataset
    assert len(ds) == 3  # the record without a pit is skipped (no_pit='skip')
    expected_rejected = ["2 + 3 = 5\n5 * 2 = 12\n", "2 + 3 = 6\n", "4 - 1 = 3\n3 + 5 = 9\n"]
    for row, rejected, chosen in zip(ds, expected_rejected, [CHOSEN1, CHOSEN1, CHOSEN2]):
        assert tokenizer.decode(row["response_ids"][1]) == rejected  # no end-of-sequence after a partial response
        assert tokenizer.decode(row["response_ids"][0]) == chosen + tokenizer.eos_token
        assert tokenizer.decode(row["prompt_ids"]) == (P1 if chosen == CHOSEN1 else P2)
    assert ds["rejected_share"] == pytest.approx([2 / 3, 1 / 3, 2 / 3])

    full = PerStepTrainer(load_tiny(tiny_model_path), _config(tmp_path, no_pit="full"), train_dataset=_records(),
                          processing_class=tokenizer)
    assert len(full.train_dataset) == 4
    last = full.train_dataset[3]["response_ids"][1]
    assert tokenizer.decode(last) == _records()[3]["response"] + tokenizer.eos_token  # the whole response


def test_advantage_weights_follow_the_steps(tiny_model_path, tokenizer, tmp_path):
    trainer = PerStepTrainer(load_tiny(tiny_model_path), _config(tmp_path, mode="advantage_weighted", positive_weight=0.5),
                             train_dataset=_records(), processing_class=tokenizer)
    ds = trainer.train_dataset
    assert len(ds) == 4
    row = ds[0]  # values [0.5, 0.75, 0, 0]: A = [0.25, -0.75, 0]
    chosen_ids, neg_ids = row["response_ids"]
    assert row["token_weights"][0] == [0.5] * len(chosen_ids) and row["is_negative"] == [0.0, 1.0]
    by_step: dict[float, str] = {}
    for token, w in zip(neg_ids, row["token_weights"][1]):
        by_step[w] = by_step.get(w, "") + tokenizer.decode([token])
    assert by_step == {0.25: "2 + 3 = 5\n", -0.75: "5 * 2 = 12\n", 0.0: "The answer is 12." + tokenizer.eos_token}
    no_positive = PerStepTrainer(load_tiny(tiny_model_path), _config(tmp_path, mode="advantage_weighted", kl_coef=0.0),
                                 train_dataset=_records(), processing_class=tokenizer)
    assert len(no_positive.train_dataset[0]["response_ids"]) == 1
    assert no_positive.reference_mode == "none" and no_positive.ref_model is None  # no KL: no reference copy


@pytest.mark.parametrize("mode", ["first_pit_dpo", "advantage_weighted"])
def test_trains_a_tiny_model_and_logs_each_term(tiny_model_path, tokenizer, tmp_path, mode):
    trainer = PerStepTrainer(load_tiny(tiny_model_path), _config(tmp_path, mode=mode, max_steps=8, kl_coef=0.1),
                             train_dataset=_records(), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    with torch.no_grad():
        before = score_responses(trainer.model, batch).token_logps
    trainer.train()
    with torch.no_grad():
        after = score_responses(trainer.model.eval(), batch).token_logps
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 8
    if mode == "first_pit_dpo":
        for key in ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "steps/rejected_share"):
            assert key in logs[0], key
        assert logs[0]["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1
        assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.05
        assert logs[-1]["loss/dpo"] < logs[0]["loss/dpo"]
    else:
        for key in ("loss/aw", "kl/ref", "advantages/mean", "advantages/negative_share", "logps/negative_steps",
                    "logps/positive_steps"):
            assert key in logs[0], key
        assert logs[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl/ref"] > 0
        assert 0 < logs[0]["advantages/negative_share"] < 1
        # on the training set: the tokens of steps that lost value (w < 0) fall, and fall more than those of
        # steps that gained value (w > 0)
        w, change = batch["token_weights"], after - before
        assert change[w < 0].mean() < -0.5
        assert change[w < 0].mean() < change[w > 0].mean() - 0.1


def _problems():
    return [{"prompt": P1, "answer": "10", "solution": CHOSEN1}, {"prompt": P2, "answer": "8", "solution": CHOSEN2}]


def _engine():
    """Samples: for P1 one correct and two wrong answers; continuations from each prefix scripted."""
    script = {
        P1: [CHOSEN1, "2 + 3 = 5\n5 * 2 = 12\nThe answer is 12.", "2 + 3 = 6\n6 * 2 = 12\nThe answer is 12."],
        P1 + "2 + 3 = 5\n": ["5 * 2 = 10\nThe answer is 10."],
        P1 + "2 + 3 = 5\n5 * 2 = 12\n": ["The answer is 12."],
        P1 + "2 + 3 = 6\n": ["6 * 2 = 12\nThe answer is 12."],
        P1 + "2 + 3 = 6\n6 * 2 = 12\n": ["The answer is 12."],
        P2: ["4 - 1 = 3\n3 + 5 = 9\nThe answer is 9."],
        P2 + "4 - 1 = 3\n": [CHOSEN2[len("4 - 1 = 3\n"):], "3 + 5 = 9\nThe answer is 9."],
        P2 + "4 - 1 = 3\n3 + 5 = 9\n": ["The answer is 9."],
    }
    return PrefixEngine(script)


class FailingEngine:
    def generate(self, *a, **k):
        raise AssertionError("sampled again although the records are cached")

    def sync_weights(self, model):
        pass


def _built(tmp_path, tokenizer, model, engine, **kw):
    rollout = RolloutArguments(rollout_n=3, rollout_max_new_tokens=16)
    return PerStepTrainer(model, _config(tmp_path, **kw), train_dataset=_problems(), processing_class=tokenizer,
                          rollout_args=rollout, rollout_engine=engine, verifier=LastNumberVerifier())


def test_records_built_from_problems_and_cached(tiny_model_path, tokenizer, tmp_path):
    engine = _engine()
    trainer = _built(tmp_path, tokenizer, load_tiny(tiny_model_path), engine, num_rollouts=2)
    # one call for the samples, one for all the step values
    assert len(engine.calls) == 2 and engine.calls[0][1] == 3 and engine.calls[1][1] == 2
    files = sorted((tmp_path / "out" / "perstep_records").glob("train-*.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    by_response = {r["response"]: r for r in records}
    assert len(records) == 3  # P1: 2 distinct negatives, P2: 1
    r = by_response["2 + 3 = 5\n5 * 2 = 12\nThe answer is 12."]
    # Q_0: P1's 2 continuations = its first 2 samples (CHOSEN1 right, next wrong) -> 0.5; after step 1 -> right
    assert r["values"] == [0.5, 1.0, 0.0, 0.0] and r["first_pit"] == 2
    assert r["chosen"] == CHOSEN1 and r["chosen_source"] == "policy" and r["answer"] == "10"
    assert by_response["2 + 3 = 6\n6 * 2 = 12\nThe answer is 12."]["first_pit"] == 1
    p2 = by_response["4 - 1 = 3\n3 + 5 = 9\nThe answer is 9."]
    assert p2["values"] == [0.0, 0.5, 0.0, 0.0] and p2["chosen_source"] == "solution"
    assert p2["first_pit"] is None  # Q drops to 0, but not below Q_0 = 0
    assert trainer.build_reports["train"]["step_values"]["unique_prefixes"] == 8
    assert len(trainer.train_dataset) == 2

    again = _built(tmp_path, tokenizer, load_tiny(tiny_model_path), FailingEngine(), num_rollouts=2)
    assert again.train_dataset["response_ids"] == trainer.train_dataset["response_ids"]
    # other settings miss the cache
    with pytest.raises(AssertionError, match="sampled again"):
        _built(tmp_path, tokenizer, load_tiny(tiny_model_path), FailingEngine(), num_rollouts=3)


@pytest.mark.parametrize("mode", ["first_pit_dpo", "advantage_weighted"])
def test_checkpoint_and_resume_equal_an_uninterrupted_run(tiny_model_path, tokenizer, tmp_path, mode):
    common = dict(mode=mode, max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=1,
                  no_pit="full", records_cache_dir=str(tmp_path / "records"))
    full = _built(tmp_path / "a", tokenizer, load_tiny(tiny_model_path), _engine(), **common)
    full.train()
    full.save_model(full.args.output_dir)

    crashed = _built(tmp_path / "b", tokenizer, load_tiny(tiny_model_path), FailingEngine(), **common)
    crashed.add_callback(crash_after_save(3))
    with pytest.raises(Crash):
        crashed.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    start = load_file(checkpoint / "model.safetensors")
    resumed = _built(tmp_path / "b", tokenizer, load_tiny(tiny_model_path), FailingEngine(), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.save_model(resumed.args.output_dir)
    a = load_file(tmp_path / "a" / "out" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "model.safetensors")
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a), "steps 4-6 did not move the weights"
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize(
    "bad, field, message",
    [
        ({"prompt": P1, "response": "a\nb", "values": [0.5, 0.0]}, "values", "expected 3 values"),
        ({"prompt": P1, "response": "a\nb", "values": [0.5, 1.5, 0.0]}, "values[1]", "success rate"),
        ({"prompt": P1, "response": "a\nb", "values": [0.5, 0.5, 0.0], "steps": ["a\n", "c"]}, "steps", "concatenate"),
        ({"prompt": P1, "response": "  ", "values": [0.5]}, "response", "empty response"),
        ({"prompt": P1, "values": [0.5]}, "response", "missing"),
        ({"prompt": P1, "response": "a\nb", "values": [0.5, 0.5, 0.0]}, "chosen", "needs a correct solution"),
    ],
)
def test_malformed_perstep_record_names_file_row_field(tiny_model_path, tokenizer, tmp_path, bad, field, message):
    path = tmp_path / "perstep.jsonl"
    path.write_text(json.dumps(_records()[0]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=message) as info:
        PerStepTrainer(load_tiny(tiny_model_path), _config(tmp_path), train_dataset=str(path), processing_class=tokenizer)
    assert info.value.source == str(path) and info.value.row == 3 and info.value.field == field


def test_recipes_parse():
    from alignkit.recipes import parse_recipe

    method, config, model_args, data_args, rollout, *_ = parse_recipe(os.path.join(REPO, "recipes", "perstep_tiny.yaml"))
    assert method == "perstep" and isinstance(config, PerStepConfig) and config.mode == "first_pit_dpo"
    assert model_args.model_name_or_path == "outputs/sft_tiny" and data_args.train_data == "synthetic:arithmetic_problems"
    method, config, model_args, data_args, rollout, *_ = parse_recipe(
        os.path.join(REPO, "recipes", "perstep_gsm8k_lora.yaml"),
        ["--mode", "advantage_weighted", "--bf16", "false"])  # bf16 needs a GPU; every other key as written
    assert method == "perstep" and config.mode == "advantage_weighted" and model_args.use_peft
    assert rollout.rollout_backend == "vllm" and rollout.verifier == "math" and config.best_of == 5
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and config.reference == "adapter"
    method, config, model_args, data_args, rollout, *_ = parse_recipe(os.path.join(REPO, "recipes", "sft_tiny.yaml"))
    assert method == "sft" and data_args.train_data == "synthetic:arithmetic_sft" and config.output_dir == "outputs/sft_tiny"


def test_first_pit_dpo_with_precomputed_reference_matches_the_live_reference(tiny_model_path, tokenizer, tmp_path):
    """reference='precomputed' caches the reference log-probs of the per-step pairs (the trainer's own record
    cache key must not shadow the base class's reference-cache fingerprint)."""
    live = PerStepTrainer(load_tiny(tiny_model_path), _config(tmp_path / "live", mode="first_pit_dpo", max_steps=2),
                          train_dataset=_records(), processing_class=tokenizer)
    pre = PerStepTrainer(load_tiny(tiny_model_path),
                         _config(tmp_path / "pre", mode="first_pit_dpo", max_steps=2, reference="precomputed"),
                         train_dataset=_records(), processing_class=tokenizer)
    live.train()
    pre.train()
    assert "ref_logps" in pre.train_dataset.column_names
    first = [h["loss/dpo"] for h in (live.state.log_history[0], pre.state.log_history[0])]
    assert first[0] == pytest.approx(first[1], abs=1e-5)
    assert first[0] == pytest.approx(0.6931, abs=1e-3)
