"""FlipGuardCallback: the logged NFR / PFR / accuracy equal the hand-computed values; ``stop`` ends training
at the first evaluation over the budget; ``best`` saves the weights of the best evaluation within the
budget; the starting model's results are cached and reused on resume; the recipe keys attach it to
every trainer (problems read with the recipe's data settings); the default ``hf`` engine path evaluates the training model greedily."""

import json
import os

import pytest
import torch
from conftest import Crash, crash_after_save, load_tiny
from fakes import LastNumberVerifier
from safetensors.torch import load_file
from transformers import TrainerCallback

from alignkit.evaluation.flip_guard import BASELINE_FILE, BEST_DIR, HISTORY_FILE, FlipGuardArguments, FlipGuardCallback
from alignkit.evaluation.flips import flip_metrics
from alignkit.rollout.base import Completion, SamplingConfig
from alignkit.rollout.hf import HFEngine
from alignkit.tasks.arithmetic import make_problems
from alignkit.trainers import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from alignkit.trainers.sft import sft_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = make_problems(10, seed=3)
TRAIN = sft_records(make_problems(24, seed=4))


def pattern(bits: str) -> list[bool]:
    return [b == "1" for b in bits]


class PatternEngine:
    """Answers call k's items right or wrong by the k-th pattern (call 0 is the starting model)."""

    def __init__(self, patterns: list[str]):
        self.patterns = [pattern(p) for p in patterns]
        self.calls = 0
        self.synced = 0

    def generate(self, prompts, n=1, sampling=None):
        assert sampling.greedy and n == 1
        right = self.patterns[self.calls]
        self.calls += 1
        answers = {p["prompt"]: p["answer"] for p in PROBLEMS}
        out = []
        for prompt, ok in zip(prompts, right):
            answer = int(answers[prompt]) + (0 if ok else 1)
            out.append([Completion(f"The answer is {answer}.", [1])])
        return out

    def sync_weights(self, model):
        self.synced += 1


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3, report_to="none",
                use_cpu=True, max_length=128, logging_steps=1, seed=0, save_strategy="no", disable_tqdm=True,
                max_steps=6)
    base.update(kw)
    return SFTConfig(**base)


def _train(tmp_path, tiny_model_path, tokenizer, guard, callbacks=(), **kw):
    trainer = SFTTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path, **kw), train_dataset=TRAIN,
                         processing_class=tokenizer, callbacks=[guard, *callbacks])
    trainer.train()
    return trainer


BASE = "1111000011"  # the starting model: 6 of 10 right


def test_logged_flip_metrics_equal_hand_computed(tiny_model_path, tokenizer, tmp_path):
    patterns = [BASE, "1011100011", "0111111111", "1111000011"]
    engine = PatternEngine(patterns)
    guard = FlipGuardCallback(PROBLEMS, eval_steps=2, engine=engine, verifier=LastNumberVerifier())
    trainer = _train(tmp_path, tiny_model_path, tokenizer, guard)
    assert engine.calls == 4 and engine.synced == 4  # baseline + steps 2, 4, 6
    logged = {h["step"]: h for h in trainer.state.log_history if "flips/nfr" in h}
    assert sorted(logged) == [2, 4, 6]
    # by hand: step 2 loses item 1 and gains item 4; step 4 loses item 0, gains 4..7
    assert logged[2]["flips/nfr"] == pytest.approx(0.1) and logged[2]["flips/pfr"] == pytest.approx(0.1)
    assert logged[4]["flips/nfr"] == pytest.approx(0.1) and logged[4]["flips/pfr"] == pytest.approx(0.4)
    assert logged[6]["flips/nfr"] == 0.0 and logged[6]["flips/accuracy"] == pytest.approx(0.6)
    assert logged[4]["flips/accuracy"] == pytest.approx(0.9)
    assert all(h["flips/accuracy_old"] == pytest.approx(0.6) for h in logged.values())
    assert "loss/sft" in logged[2]  # merged into the step's regular log entry
    for step, p in zip([2, 4, 6], patterns[1:]):
        m = flip_metrics(pattern(BASE), pattern(p))
        assert logged[step]["flips/nfr"] == pytest.approx(m.nfr) and logged[step]["flips/pfr"] == pytest.approx(m.pfr)
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert [h["step"] for h in history["history"]] == [2, 4, 6]
    assert [h["negative_flips"] for h in history["history"]] == [1, 1, 0]
    assert history["best"] is None and history["stopped_at"] is None


class RewordingEngine(PatternEngine):
    """Like PatternEngine, but every other call words its answers differently (a wrong answer stays the same number)."""

    def generate(self, prompts, n=1, sampling=None):
        reword = self.calls % 2 == 1
        out = super().generate(prompts, n, sampling)
        if reword:
            for group in out:
                number = group[0].text.removeprefix("The answer is ").rstrip(".")
                group[0] = Completion(f"Adding it all up, we get $\\boxed{{{number}}}$.", [1])
        return out


def test_nfr_mc_compares_answers_not_wording(tiny_model_path, tokenizer, tmp_path):
    """With the math verifier, a wrong answer reworded is not a changed answer: NFR_mc counts only the
    items whose answer changed to a wrong one (here the negative flips), not every reworded wrong item."""
    from alignkit.verifiers.math import MathVerifier

    patterns = [BASE, "1011100011", "0111111111", "1111000011"]
    guard = FlipGuardCallback(PROBLEMS, eval_steps=2, engine=RewordingEngine(patterns),
                              verifier=MathVerifier(num_workers=1))
    trainer = _train(tmp_path, tiny_model_path, tokenizer, guard)
    logged = {h["step"]: h for h in trainer.state.log_history if "flips/nfr" in h}
    for step in (2, 4, 6):
        assert logged[step]["flips/nfr_mc"] == pytest.approx(logged[step]["flips/nfr"]), step
    # raw text: at steps 2 and 6 (reworded) every wrong item would count as changed
    assert flip_metrics(pattern(BASE), pattern(patterns[1]), changed=[True] * 10).nfr_mc == pytest.approx(0.4)
    assert logged[2]["flips/nfr_mc"] == pytest.approx(0.1)
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert [h["nfr_mc"] for h in history["history"]] == pytest.approx([0.1, 0.1, 0.0])


def test_stop_ends_training_at_the_first_violation(tiny_model_path, tokenizer, tmp_path):
    # NFR 0.1 (within 0.15), then 0.2 (over): stop at step 4; the step-6 pattern is never used
    engine = PatternEngine([BASE, "0111000011", "0011000011", "0000000000"])
    guard = FlipGuardCallback(PROBLEMS, eval_steps=2, max_nfr=0.15, action="stop", engine=engine,
                              verifier=LastNumberVerifier())
    trainer = _train(tmp_path, tiny_model_path, tokenizer, guard)
    assert trainer.state.global_step == 4 and engine.calls == 3
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert history["stopped_at"] == 4
    assert [(h["step"], h["within_budget"]) for h in history["history"]] == [(2, True), (4, False)]
    assert [h["flips/nfr"] for h in trainer.state.log_history if "flips/nfr" in h] == pytest.approx([0.1, 0.2])


class RecordWeights(TrainerCallback):
    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_best_keeps_the_most_accurate_checkpoint_within_budget(tiny_model_path, tokenizer, tmp_path):
    # step 2: acc 0.6, NFR 0.1 | step 4: acc 0.8 but NFR 0.3 (over 0.25) | step 6: acc 0.5, NFR 0.1 -> best = step 2
    engine = PatternEngine([BASE, "0111100011", "0001111111", "0111000011"])
    guard = FlipGuardCallback(PROBLEMS, eval_steps=2, max_nfr=0.25, action="best", engine=engine,
                              verifier=LastNumberVerifier())
    record = RecordWeights()
    trainer = _train(tmp_path, tiny_model_path, tokenizer, guard, callbacks=[record])
    assert trainer.state.global_step == 6  # best never stops training
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert history["best"]["step"] == 2 and history["best"]["accuracy"] == pytest.approx(0.6)
    saved = load_file(tmp_path / "out" / BEST_DIR / "model.safetensors")
    step2, step6 = record.weights[2], record.weights[6]
    assert any((step2[k] - step6[k]).abs().max() > 1e-4 for k in saved)
    for k in saved:
        torch.testing.assert_close(saved[k], step2[k], atol=0, rtol=0, msg=k)
    assert (tmp_path / "out" / BEST_DIR / "tokenizer.json").exists()
    assert json.loads((tmp_path / "out" / BEST_DIR / "flip_guard_best.json").read_text())["step"] == 2


def test_baseline_is_cached_and_reused_on_resume(tiny_model_path, tokenizer, tmp_path):
    engine = PatternEngine([BASE, "1111100011", "1111110011"])
    guard = FlipGuardCallback(PROBLEMS, eval_steps=2, action="best", engine=engine, verifier=LastNumberVerifier())
    with pytest.raises(Crash):
        _train(tmp_path, tiny_model_path, tokenizer, guard, callbacks=[crash_after_save(4)], save_strategy="steps",
               save_steps=2)
    cached = json.loads((tmp_path / "out" / BASELINE_FILE).read_text())
    assert cached["correct"] == pattern(BASE) and cached["step"] == 0

    # resumed: the engine's first call is the step-6 evaluation, the baseline comes from the cache
    resumed_engine = PatternEngine(["0111111111"])
    guard2 = FlipGuardCallback(PROBLEMS, eval_steps=2, action="best", engine=resumed_engine,
                               verifier=LastNumberVerifier())
    trainer = SFTTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path, save_strategy="steps", save_steps=2),
                         train_dataset=TRAIN, processing_class=tokenizer, callbacks=[guard2])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed_engine.calls == 1 and not guard2.baseline_computed
    assert guard2.baseline == pattern(BASE)
    logged = [h for h in trainer.state.log_history if "flips/nfr" in h]
    assert logged[-1]["step"] == 6 and logged[-1]["flips/nfr"] == pytest.approx(0.1)  # item 0 lost vs BASE
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert [h["step"] for h in history["history"]] == [2, 4, 6]  # restored up to the checkpoint, then continued
    assert history["best"]["step"] == 6 and history["best"]["accuracy"] == pytest.approx(0.9)

    # a fresh run (step 0) with other starting weights does not take the cached baseline
    fresh_engine = PatternEngine(["0000000000", "0000000000", "0000000000", "0000000000"])
    guard3 = FlipGuardCallback(PROBLEMS, eval_steps=2, engine=fresh_engine, verifier=LastNumberVerifier())
    other = load_tiny(tiny_model_path)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    SFTTrainer(model=other, args=_config(tmp_path), train_dataset=TRAIN, processing_class=tokenizer,
               callbacks=[guard3]).train()
    assert guard3.baseline_computed and guard3.baseline == pattern("0000000000")


def test_recipe_keys_attach_the_guard_with_the_hf_engine(tiny_model_path, tokenizer, tmp_path):
    """The recipe keys flip_guard_* are parsed into FlipGuardArguments (not the method's config); the recipe
    layer loads the problems with the recipe's data settings and attaches the callback to any trainer."""
    from alignkit.recipes import DataArguments, parse_recipe, plugins

    problems = make_problems(6, seed=9)
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    recipe = parse_recipe(os.path.join(REPO, "recipes", "dpo_tiny.yaml"), [
        "--flip_guard_data", str(path), "--flip_guard_steps", "1", "--flip_guard_max_new_tokens", "12",
        "--flip_guard_max_items", "4"])
    assert not hasattr(recipe.config, "flip_guard_data") and recipe.flip_guard_args.flip_guard_steps == 1
    attached = plugins(tokenizer, DataArguments(chat="false"), recipe.compat_args, recipe.flip_guard_args)
    assert attached["aux_losses"] == []
    model = load_tiny(tiny_model_path)
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, report_to="none", use_cpu=True,
                       max_length=128, logging_steps=1, save_strategy="no", disable_tqdm=True, max_steps=1)
    from alignkit.tasks.arithmetic import make_preference_pairs

    trainer = DPOTrainer(model=model, args=config, train_dataset=make_preference_pairs(4, seed=1),
                         processing_class=tokenizer, **attached)
    guards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FlipGuardCallback)]
    assert len(guards) == 1 and guards[0].trainer is trainer and len(guards[0].problems) == 4
    # the starting model's greedy answers, computed before training, equal a direct generation
    direct = HFEngine(load_tiny(tiny_model_path), tokenizer, progress=False).generate(
        [p["prompt"] for p in problems[:4]], n=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=12))
    trainer.train()
    cached = json.loads((tmp_path / "dpo" / BASELINE_FILE).read_text())
    assert cached["texts"] == [g[0].text for g in direct]
    logged = [h for h in trainer.state.log_history if "flips/nfr" in h]
    assert len(logged) == 1 and logged[0]["step"] == 1 and 0.0 <= logged[0]["flips/accuracy"] <= 1.0

    plain = SFTTrainer(model=load_tiny(tiny_model_path), args=_config(tmp_path), train_dataset=TRAIN,
                       processing_class=tokenizer)
    assert not any(isinstance(cb, FlipGuardCallback) for cb in plain.callback_handler.callbacks)


def test_recipe_layer_reads_synthetic_problems_chat_formatted(tokenizer):
    """A recipe source (synthetic held-out problems) is read by the recipe layer, with the recipe's chat
    setting: chat messages for a tokenizer with a chat template, text with chat: false."""
    from alignkit.recipes import DataArguments, plugins

    guard_args = FlipGuardArguments(flip_guard_data="synthetic:arithmetic_problems", flip_guard_max_items=5)
    chat = plugins(tokenizer, DataArguments(), None, guard_args)["callbacks"][0]
    text = plugins(tokenizer, DataArguments(chat="false"), None, guard_args)["callbacks"][0]
    assert len(chat.problems) == len(text.problems) == 5
    assert all(isinstance(p["prompt"], list) and p["prompt"][-1]["role"] == "user" for p in chat.problems)
    assert [p["prompt"][-1]["content"] for p in chat.problems] == [p["prompt"] for p in text.problems]
    with pytest.raises(ValueError, match="recipe layer"):
        FlipGuardCallback("synthetic:arithmetic_problems")


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"one of \('log', 'stop', 'best'\).*'keep'"):
        FlipGuardCallback(PROBLEMS, action="keep")
    with pytest.raises(ValueError, match=r"one of \('log', 'stop', 'best'\)"):
        FlipGuardArguments(flip_guard_action="halt")
    with pytest.raises(ValueError, match="max_nfr"):
        FlipGuardCallback(PROBLEMS, action="stop")
    with pytest.raises(ValueError, match="flip_guard_max_nfr"):
        FlipGuardArguments(flip_guard_data="synthetic:arithmetic_problems", flip_guard_action="stop")
    with pytest.raises(ValueError, match="empty"):
        FlipGuardCallback([])
