"""The caches of alignkit: a changed middle-layer weight (same model path, same output dir) must miss.

The stale-cache case of issue 17: the reference log-probs were keyed by the norms of the first and last
parameters only, so a rerun with one middle-layer weight changed reused the first model's values.
"""

import torch
from conftest import load_tiny

from alignkit.scoring import score_responses
from alignkit.tasks.arithmetic import make_preference_pairs
from alignkit.trainers import DPOConfig, DPOTrainer


def _changed_middle_layer(path):
    """The tiny model with one middle-layer weight changed; first and last parameters untouched."""
    model = load_tiny(path)
    params = list(model.named_parameters())
    name, weight = next((n, p) for n, p in params if "layers.0.mlp.down_proj" in n)
    assert name not in (params[0][0], params[-1][0])
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    return model


def test_reference_logps_cache_misses_when_a_middle_layer_weight_changes(tiny_model_path, tokenizer, tmp_path):
    pairs = make_preference_pairs(8)
    args = DPOConfig(output_dir=str(tmp_path / "out"), reference="precomputed", per_device_train_batch_size=4,
                     per_device_eval_batch_size=8, report_to="none", use_cpu=True, max_length=128, save_strategy="no")
    first = DPOTrainer(model=load_tiny(tiny_model_path), args=args, train_dataset=pairs, processing_class=tokenizer)
    first.get_train_dataloader()
    cached = torch.tensor(first.train_dataset["ref_logps"])

    changed = _changed_middle_layer(tiny_model_path)
    second = DPOTrainer(model=changed, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = second.data_collator([second.train_dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        live = score_responses(changed, batch).logps.view(-1, 2)
    second.get_train_dataloader()
    reused = torch.tensor(second.train_dataset["ref_logps"])
    assert (live - cached).abs().max() > 1e-3, "the change does not move the log-probs: the test proves nothing"
    torch.testing.assert_close(reused, live, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ the other four caches


class CountingScriptEngine:
    """Scripted completions by prompt text (or the last chat message); counts generate calls."""

    def __init__(self, default="The answer is 7."):
        self.default, self.calls = default, 0

    def generate(self, prompts, n=1, sampling=None):
        from alignkit.rollout.base import Completion

        self.calls += 1
        return [[Completion(f"{self.default} ({k})", [1, 2], [-1.0, -1.0], "stop") for k in range(n)] for _ in prompts]

    def sync_weights(self, model):
        pass


def test_d2o_reference_samples_cache_misses_when_a_middle_layer_weight_changes(tiny_model_path, tokenizer, tmp_path):
    from alignkit.reference_samples import cached_samples
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.setup import RolloutSetup

    prompts = ["Start with 1. Add 2.", "Start with 3. Add 4."]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=0)

    def samples(model, engine):
        return cached_samples(RolloutSetup(tokenizer=tokenizer, engine=engine), model, prompts, 2, sampling,
                              cache_dir=tmp_path / "samples", name="train")

    engine = CountingScriptEngine()
    first = samples(load_tiny(tiny_model_path), engine)
    assert engine.calls == 1 and len(first) == 2 and len(first[0]) == 2
    assert samples(load_tiny(tiny_model_path), engine) == first and engine.calls == 1  # same weights: a hit
    samples(_changed_middle_layer(tiny_model_path), engine)
    assert engine.calls == 2, "other weights must miss the samples cache"


def test_perstep_records_cache_misses_when_a_middle_layer_weight_changes(tiny_model_path, tokenizer, tmp_path):
    from fakes import LastNumberVerifier

    from alignkit.rollout.arguments import RolloutArguments
    from alignkit.trainers import PerStepConfig, PerStepTrainer

    problems = [{"prompt": "Start with 2. Add 3. What is the result?", "answer": "5", "solution": "2 + 3 = 5\nThe answer is 5."}]
    config = PerStepConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, report_to="none",
                           use_cpu=True, max_length=96, save_strategy="no", no_pit="full", num_rollouts=1)

    def build(model):
        engine = CountingScriptEngine("2 + 3 = 6\nThe answer is 6.")
        PerStepTrainer(model, config, train_dataset=problems, processing_class=tokenizer,
                       rollout_args=RolloutArguments(rollout_n=2, rollout_max_new_tokens=8), rollout_engine=engine,
                       verifier=LastNumberVerifier())
        return engine.calls

    assert build(load_tiny(tiny_model_path)) == 2  # the samples, then the step values
    assert build(load_tiny(tiny_model_path)) == 0  # same weights: read from the cache
    assert build(_changed_middle_layer(tiny_model_path)) == 2, "other weights must miss the records cache"


def test_flip_guard_baseline_misses_when_a_middle_layer_weight_changes(tiny_model_path, tokenizer, tmp_path):
    from fakes import LastNumberVerifier

    from alignkit.evaluation.flip_guard import FlipGuardCallback
    from alignkit.tasks.arithmetic import make_problems
    from alignkit.trainers import SFTConfig, SFTTrainer
    from alignkit.trainers.sft import sft_records

    problems = make_problems(3, seed=3)
    config = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none", use_cpu=True,
                       max_length=96, save_strategy="no", max_steps=1, disable_tqdm=True)

    def run(model):
        guard = FlipGuardCallback(problems, eval_steps=5, engine=CountingScriptEngine(), verifier=LastNumberVerifier())
        SFTTrainer(model, config, train_dataset=sft_records(problems), processing_class=tokenizer,
                   callbacks=[guard]).train()
        return guard.baseline_computed

    assert run(load_tiny(tiny_model_path)) is True
    assert run(load_tiny(tiny_model_path)) is False  # the same starting model: the cached baseline
    assert run(_changed_middle_layer(tiny_model_path)) is True, "another starting model must miss the baseline"


def test_onpolicy_state_misses_when_a_middle_layer_weight_changes(tiny_model_path, tokenizer, tmp_path):
    from fakes import LastNumberVerifier

    from alignkit.onpolicy import run_onpolicy_rounds
    from alignkit.rollout.arguments import RolloutArguments
    from alignkit.tasks.arithmetic import make_problems
    from alignkit.trainers import DPOConfig, DPOTrainer

    problems = make_problems(2, seed=1)
    config = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none", use_cpu=True,
                       max_length=96, save_strategy="no", max_steps=1, disable_tqdm=True, onpolicy_rounds=1)

    def run(model, resume):
        engine = CountingScriptEngine()
        run_onpolicy_rounds(trainer_cls=DPOTrainer, config=config, model=model, tokenizer=tokenizer, problems=problems,
                            rollout_args=RolloutArguments(rollout_n=2, rollout_max_new_tokens=8),
                            build_records=lambda rows: DPOTrainer.onpolicy_records(config, rows), resume=resume,
                            rollout_engine=engine, verifier=LastNumberVerifier())
        return engine.calls

    assert run(load_tiny(tiny_model_path), resume=False) == 1
    assert run(load_tiny(tiny_model_path), resume=True) == 0  # the same inputs: the finished round is reused
    assert run(_changed_middle_layer(tiny_model_path), resume=True) == 1, "another starting model must start over"
