"""Eval suites: the shipped YAML files, key checking, problems and ids, run_suite with a fake engine and a
tiny model, and ``alignkit flips`` / ``alignkit evaluate`` on models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.evaluation.flips_cli import evaluate_main, flips_main
from alignkit.evaluation.suites import (
    EvalSuite,
    SuiteError,
    load_suite,
    render_prompt,
    run_suite,
    suite_from_dict,
    suite_problems,
)
from alignkit.rollout.base import Completion
from alignkit.verifiers import get_verifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVALS = Path(__file__).resolve().parents[1] / "evals"


def test_shipped_suites_load():
    arithmetic = load_suite(EVALS / "arithmetic.yaml")
    assert (arithmetic.name, arithmetic.data, arithmetic.verifier) == ("arithmetic", "synthetic:arithmetic_problems", "math")
    assert arithmetic.generation.n == 1 and arithmetic.generation.temperature == 0.0
    assert arithmetic.synthetic_size == 200
    gsm8k = load_suite(EVALS / "gsm8k.yaml")
    assert gsm8k.data == "gsm8k:openai/gsm8k" and gsm8k.split == "test" and gsm8k.dataset_config == "main"
    champ = load_suite(EVALS / "champ.yaml")
    assert champ.data == "champ" and champ.chat and "{prompt}" in champ.template


def test_unknown_and_ill_typed_keys_name_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: synthetic:arithmetic_problems\nverifer: math\n")
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert e.value.key == "verifer" and str(path) in str(e.value) and "unknown key" in str(e.value)
    path.write_text("data: synthetic:arithmetic_problems\ngeneration:\n  max_tokens: 8\n")
    with pytest.raises(SuiteError, match=r"bad.yaml, key 'generation.max_tokens': unknown key"):
        load_suite(path)
    path.write_text("data: synthetic:arithmetic_problems\nlimit: many\n")
    with pytest.raises(SuiteError, match=r"key 'limit': expected int or null, got str"):
        load_suite(path)
    path.write_text("data: synthetic:arithmetic_problems\ngeneration:\n  temperature: -1\n")
    with pytest.raises(SuiteError, match="temperature must be >= 0"):
        load_suite(path)
    path.write_text("verifier: math\n")
    with pytest.raises(SuiteError, match="key 'data': missing"):
        load_suite(path)


def test_problems_ids_limit_and_local_files(tmp_path):
    suite = suite_from_dict({"data": "synthetic:arithmetic_problems", "limit": 5})
    problems = suite_problems(suite)
    assert [p["id"] for p in problems] == [0, 1, 2, 3, 4]
    assert problems == suite_problems(suite_from_dict({"data": "synthetic:arithmetic_problems"}))[:5]  # stable
    # a local problems file next to the suite, with its own ids, a template and chat
    (tmp_path / "probs.jsonl").write_text(
        "\n".join(json.dumps({"id": f"p{i}", "prompt": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in range(3)) + "\n"
    )
    (tmp_path / "local.yaml").write_text(
        "data: probs.jsonl\ntemplate: \"Q: {prompt}\\nA:\"\nchat: true\nsystem: Be brief.\nverifier: match\n"
        "verifier_options: {mode: numeric, extract: answer}\n"
    )
    suite = load_suite(tmp_path / "local.yaml")
    assert suite.name == "local" and suite.data == str(tmp_path / "probs.jsonl")
    problems = suite_problems(suite)
    assert [p["id"] for p in problems] == ["p0", "p1", "p2"]
    assert render_prompt(suite, problems[1]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: What is 1+1?\nA:"}
    ]
    bad = EvalSuite(name="x", data=str(tmp_path / "probs.jsonl"), template="{question}")
    with pytest.raises(SuiteError, match="names field 'question'"):
        render_prompt(bad, problems[0])
    # GSM8K format from a local file
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "2 apples and 3 more?", "answer": "2+3=5\n#### 5"}) + "\n")
    gsm = suite_problems(suite_from_dict({"data": f"gsm8k:{tmp_path / 'gsm.jsonl'}"}))
    assert gsm[0]["id"] == 0 and gsm[0]["answer"] == "5" and isinstance(gsm[0]["prompt"], list)


def test_champ_suite_problems():
    pytest.importorskip("champ_dataset")
    suite = load_suite(EVALS / "champ.yaml")
    problems = suite_problems(suite)
    assert len(problems) == 270 and problems[0]["id"] == "P_Combinatorics_1"
    prompt = render_prompt(suite, problems[0])
    assert prompt[0]["role"] == "user" and problems[0]["prompt"] in prompt[0]["content"]
    assert prompt[0]["content"].endswith("Put the final answer in \\boxed{}.")


class AnswerEvenIds:
    """A fake engine: the right answer for even-indexed prompts, a wrong one for odd ones."""

    def __init__(self, problems):
        self.answers = {p["prompt"]: (p["answer"], p["id"]) for p in problems}

    def generate(self, prompts, n=1, sampling=None):
        out = []
        for prompt in prompts:
            answer, index = self.answers[prompt]
            value = answer if index % 2 == 0 else str(int(answer) + 1)
            out.append([Completion(f"The answer is {value}.", [], finish_reason="stop")] * n)
        return out

    def sync_weights(self, model):
        pass


def test_run_suite_with_a_fake_engine():
    suite = suite_from_dict({"data": "synthetic:arithmetic_problems", "limit": 6, "chat": False})
    problems = suite_problems(suite)
    rows = run_suite(suite, engine=AnswerEvenIds(problems), num_workers=1)
    assert [r["id"] for r in rows] == list(range(6))
    assert [r["correct"] for r in rows] == [True, False] * 3
    assert [r["score"] for r in rows] == [1.0, 0.0] * 3
    assert [r["reference"] for r in rows] == [p["answer"] for p in problems]
    assert rows[0]["prediction"] == f"The answer is {problems[0]['answer']}."
    suite.generation.n = 3
    rows = run_suite(suite, engine=AnswerEvenIds(problems), num_workers=1)
    assert len(rows[0]["predictions"]) == 3 and rows[0]["score"] == 1.0


def test_run_suite_with_a_tiny_model(tiny_model_path):
    from conftest import load_tiny
    from transformers import AutoTokenizer

    model, tokenizer = load_tiny(tiny_model_path), AutoTokenizer.from_pretrained(tiny_model_path)
    suite = load_suite(EVALS / "arithmetic.yaml")
    suite.limit, suite.generation.max_new_tokens = 8, 24
    rows = run_suite(suite, model, tokenizer, num_workers=1, progress=False)
    problems = suite_problems(suite)
    assert [r["id"] for r in rows] == list(range(8))
    math = get_verifier("math")
    for row, problem in zip(rows, problems):
        assert row["reference"] == problem["answer"]
        verdict = math.verify(problem, row["prediction"])
        assert row["correct"] == verdict.correct and row["score"] == verdict.score
        assert row["finish_reason"] in ("stop", "length")


def test_flips_on_the_same_tiny_model_twice_is_nfr_zero(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "flips"
    rc = flips_main([
        "--old_model", tiny_model_path, "--new_model", tiny_model_path, "--suite", str(EVALS / "arithmetic.yaml"),
        "--limit", "8", "--max_new_tokens", "24", "--num_workers", "1", "--out", str(out), "--max-nfr", "0",
    ])
    assert rc == 0
    old = (out / "old_predictions.jsonl").read_text().splitlines()
    new = (out / "new_predictions.jsonl").read_text().splitlines()
    assert len(old) == 8 and old == new
    flips = json.loads((out / "flips.json").read_text())
    assert flips["items"] == 8 and flips["nfr"] == 0.0 and flips["discrete"]["nfr_mc"] == 0.0
    assert flips["negative_flip_ids"] == [] and flips["settings"]["suite"].endswith("arithmetic.yaml")
    assert (out / "report.md").exists() and (out / "flips.png").exists()
    assert "passed" in capsys.readouterr().out


def test_evaluate_writes_predictions(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    rc = evaluate_main([
        "--model", tiny_model_path, "--eval_data", "synthetic:arithmetic_problems", "--verifier", "math",
        "--limit", "4", "--max_new_tokens", "8", "--num_workers", "1", "--out", str(out),
    ])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"id", "reference", "prediction", "correct", "score"}
    assert "eval_data: accuracy" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("data: synthetic:arithmetic_problems\nmodel: x\n")
    assert evaluate_main(["--model", tiny_model_path, "--suite", str(tmp_path / "bad.yaml"), "--out", str(out)]) == 2
    assert "key 'model': unknown key" in capsys.readouterr().err
