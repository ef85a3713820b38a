"""On-policy DPO rounds: sampling from the updated policy, gold fallback, resume without re-sampling."""

import json

import pytest
import safetensors.torch
import torch

from alignkit.onpolicy import round_problems
from alignkit.recipes import parse_recipe, run_recipe
from alignkit.verifiers import register_verifier
from tests.conftest import load_tiny
from tests.fakes import LastNumberVerifier

register_verifier("last-number", LastNumberVerifier)
RECIPE = "recipes/dpo_onpolicy_tiny.yaml"
SMALL = ["--synthetic_train_size", "12", "--prompts_per_round", "6", "--rollout_n", "2",
         "--rollout_max_new_tokens", "12", "--verifier", "last-number", "--save_steps", "1",
         "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"]


def _run(tmp_path, name, rounds, *extra):
    out = tmp_path / name
    run_recipe(*parse_recipe(RECIPE, SMALL + ["--output_dir", str(out), "--onpolicy_rounds", str(rounds), *extra]))
    return out


def _weights(path):
    return safetensors.torch.load_file(str(path / "model.safetensors"))


def test_round_problems_rotate():
    problems = [{"i": i} for i in range(5)]
    assert [p["i"] for p in round_problems(problems, 0, 2)] == [0, 1]
    assert [p["i"] for p in round_problems(problems, 2, 2)] == [4, 0]
    assert len(round_problems(problems, 3, None)) == 5


def test_rounds_sample_from_the_updated_policy_and_fall_back_to_gold(tmp_path):
    out = _run(tmp_path, "run", 2)
    state = json.loads((out / "onpolicy_state.json").read_text())
    assert state["rounds_completed"] == 2 and [h["round"] for h in state["history"]] == [0, 1]
    records = [json.loads(line) for line in (out / "round_0" / "records.jsonl").read_text().splitlines()]
    # a random tiny model never solves the task: every pair uses the gold solution as chosen
    assert records and all(r["chosen_source"] == "solution" and r["chosen"] == r["solution"] for r in records)
    assert all(r["rejected"] != r["chosen"] for r in records)
    # round 1 was sampled from the weights round 0 trained, not from the initial model
    rows = [json.loads(line) for line in (out / "round_1" / "rollouts.jsonl").read_text().splitlines()]
    trained, initial = load_tiny(out / "round_0" / "model"), load_tiny(_tiny_path())
    from transformers import AutoTokenizer

    from alignkit.rollout.base import prompt_token_ids

    tok = AutoTokenizer.from_pretrained(out)
    c = rows[0]["completions"][0]
    ids = torch.tensor([prompt_token_ids(tok, rows[0]["prompt"]) + c["token_ids"]])
    k = len(c["token_ids"])

    def logps(model):
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, -k - 1 : -1].float(), -1)
        return lp.gather(-1, ids[0, -k:, None]).squeeze(-1)

    torch.testing.assert_close(logps(trained), torch.tensor(c["logprobs"]), atol=1e-4, rtol=0)
    assert (logps(initial) - torch.tensor(c["logprobs"])).abs().max() > 1e-2
    stats = json.loads((out / "round_1" / "rollout_stats.json").read_text())
    assert stats["prompts"] == 6 and stats["completions"] == 12 and stats["records"] == len(
        (out / "round_1" / "records.jsonl").read_text().splitlines())


def _tiny_path():
    from alignkit.modeling import resolve_model_path

    return resolve_model_path("tiny:qwen2")


def test_resume_skips_finished_rounds_and_matches_an_uninterrupted_run(tmp_path):
    straight = _run(tmp_path, "straight", 2)
    split = _run(tmp_path, "split", 1)
    first_rollouts = (split / "round_0" / "rollouts.jsonl").stat().st_mtime_ns
    _run(tmp_path, "split", 2, "--resume_from_checkpoint", "auto")
    assert (split / "round_0" / "rollouts.jsonl").stat().st_mtime_ns == first_rollouts, "round 0 was re-sampled"
    assert (split / "round_1" / "rollouts.jsonl").read_text() == (straight / "round_1" / "rollouts.jsonl").read_text()
    a, b = _weights(straight), _weights(split)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_lora_rounds_keep_the_base_as_reference(tmp_path):
    out = _run(tmp_path, "lora", 1, "--use_peft", "true", "--lora_r", "4")
    assert (out / "round_0" / "model" / "adapter_model.safetensors").exists()
    assert not (out / "round_0" / "model" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="needs full fine-tuning"):
        _run(tmp_path, "lora-round", 1, "--use_peft", "true", "--onpolicy_reference", "round")


def test_two_processes_share_the_sampling_and_train_on_the_same_records(tmp_path):
    """Each process samples half the prompts; the main process verifies and writes the records."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    args = [a for a in SMALL]
    args[args.index("last-number")] = "math"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
         "-m", "alignkit", "train", RECIPE, *args, "--onpolicy_rounds", "2", "--output_dir", str(out),
         "--per_device_train_batch_size", "2"],
        env=env, cwd=repo, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((out / "onpolicy_state.json").read_text())
    assert state["rounds_completed"] == 2
    from alignkit.tasks.arithmetic import make_problems

    # the tiny tokenizer has a chat template: recipe prompts are chat messages (alignkit.data.prompts)
    expected = [[{"role": "user", "content": p["prompt"]}] for p in make_problems(12, seed=0)]
    for r, start in ((0, 0), (1, 6)):
        rows = [json.loads(line) for line in (out / f"round_{r}" / "rollouts.jsonl").read_text().splitlines()]
        assert [row["prompt"] for row in rows] == expected[start : start + 6]  # every prompt once, in order
        assert all(len(row["completions"]) == 2 for row in rows)
    assert (out / "model.safetensors").exists()


class _ClosableEngine:
    def __init__(self):
        self.closed = 0

    def generate(self, prompts, n=1, sampling=None):
        raise AssertionError("not sampled in this test")

    def sync_weights(self, model):
        pass

    def close(self):
        self.closed += 1


def test_rollout_setup_closes_the_engine_it_built_and_leaves_one_passed_in_open():
    from alignkit.rollout.setup import RolloutSetup

    built = []
    setup = RolloutSetup(engine=lambda model, tokenizer: built.append(_ClosableEngine()) or built[-1])
    setup.engine(object())
    setup.close()
    assert built[0].closed == 1 and not setup.built
    setup.engine(object())  # a later call builds a new engine
    assert len(built) == 2 and setup.built
    mine = _ClosableEngine()
    passed_in = RolloutSetup(engine=mine)
    passed_in.engine(object())
    passed_in.close()
    assert mine.closed == 0 and passed_in.built


def test_onpolicy_rounds_close_their_engine_and_skip_the_sync_after_the_last_round(tmp_path):
    """The engine is shut down when the rounds end (a vLLM engine left to exit-time destructors printed a
    traceback once the process group was gone), and it is not synced again after the last round."""
    from alignkit.onpolicy import run_onpolicy_rounds

    events = []

    class Engine(_ClosableEngine):
        def generate(self, prompts, n=1, sampling=None):
            events.append("generate")
            from alignkit.rollout.base import Completion

            return [[Completion("The answer is 0.", [1], [-1.0], "stop")] * n for _ in prompts]

        def sync_weights(self, model):
            events.append("sync")

        def close(self):
            events.append("close")

    method, config, model_args, data_args, rollout_args, *_ = parse_recipe(
        RECIPE, SMALL + ["--output_dir", str(tmp_path / "run"), "--onpolicy_rounds", "2"])
    from alignkit.modeling import load_model_and_tokenizer
    from alignkit.recipes import _records_list, load_data, method_classes

    _, trainer_cls = method_classes(method)
    model, tokenizer = load_model_and_tokenizer(model_args)
    problems = _records_list(load_data(data_args.train_data, data_args, "problems", train=True, tokenizer=tokenizer))
    run_onpolicy_rounds(trainer_cls=trainer_cls, config=config, model=model, tokenizer=tokenizer, problems=problems,
                        rollout_args=rollout_args, build_records=lambda rows: trainer_cls.onpolicy_records(config, rows),
                        rollout_engine=lambda m, t: Engine(), verifier=LastNumberVerifier())
    assert events == ["generate", "sync", "generate", "close"], events
