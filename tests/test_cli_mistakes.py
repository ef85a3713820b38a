"""Every common CLI mistake is one line on stderr and exit 2, naming the problem and, where a name was
mistyped, the close ones ("did you mean"); ``alignkit train [METHOD] --help`` lists the keys with their help;
``alignkit train`` says where it saved (issue 18, item 3)."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.cli import main, train_help
from alignkit.did_you_mean import close_matches, did_you_mean

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "dpo_tiny.yaml")


def run(argv, capsys):
    """``(exit code, stdout, the non-empty stderr lines that are not alignkit's log messages)``."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[alignkit]")]
    return code, out, lines


def one_line(argv, capsys, *fragments):
    code, out, lines = run(argv, capsys)
    assert code == 2, (code, out, lines)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in lines[0]
    return lines[0]


def test_did_you_mean():
    assert did_you_mean("betta", ["beta", "loss_type"]) == "; did you mean 'beta'?"
    assert did_you_mean("mathh", ["code", "match", "math"]) == "; did you mean 'math' or 'match'?"
    assert did_you_mean("betta", ["beta"], prefix="--") == "; did you mean '--beta'?"
    assert did_you_mean("zzzzzz", ["beta"]) == ""
    assert close_matches("MATH", ["math", "code"]) == ["math"]  # a case slip


def test_unknown_command(capsys):
    line = one_line(["trian"], capsys, "unknown command 'trian'", "did you mean 'train'?")
    assert line.startswith("alignkit: error:")
    code, out, lines = run(["--help"], capsys)
    assert code == 0 and "alignkit train RECIPE.yaml" in out and "unlearning-eval" in out and not lines


def test_recipe_key_typo(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: dpo\nbetta: 0.1\n")
    line = one_line(["train", str(recipe)], capsys, "r.yaml", "unknown recipe key 'betta'", "did you mean 'beta'?")
    assert line.startswith("alignkit train: error:")


def test_unknown_override(capsys):
    one_line(["train", RECIPE, "--betta", "0.2"], capsys, "unknown option --betta", "did you mean '--beta'?")
    one_line(["train", "dpo", "--learning-rat=1e-4"], capsys, "unknown option --learning_rat",
             "did you mean '--learning_rate'?")


def test_wrong_model_path(tmp_path, capsys):
    one_line(["train", RECIPE, "--model_name_or_path", str(tmp_path / "no" / "model")], capsys,
             f"model '{tmp_path / 'no' / 'model'}': no such directory")
    (tmp_path / "empty").mkdir()
    one_line(["train", RECIPE, "--model_name_or_path", str(tmp_path / "empty")], capsys,
             "the directory holds no model (no config.json)")
    one_line(["train", RECIPE, "--model_name_or_path", "smolm2"], capsys,  # offline: not in the cache
             "model 'smolm2'", "did you mean 'smollm2'?")


def test_unknown_method_and_recipe_file(tmp_path, capsys):
    one_line(["train", "dpoo"], capsys, "no recipe file 'dpoo'", "did you mean the method 'dpo'?")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: dop\n")
    one_line(["train", str(recipe)], capsys, "unknown method 'dop'", "did you mean 'dpo'")
    one_line(["train"], capsys, "a recipe file or a method (dpo, npo, d2o, sft, perstep, kto) comes first")


def test_unknown_verifier(tmp_path, capsys):
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"prompt": "p", "answer": "7", "completions": [{"text": "7"}]}) + "\n")
    one_line(["verify", "--verifier", "mathh", "--input", str(rollouts), "--out", str(tmp_path / "v.jsonl")],
             capsys, "unknown verifier 'mathh'", "did you mean 'math' or 'match'?", "registered:")
    assert not (tmp_path / "v.jsonl").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: dpo\nonpolicy_rounds: 1\ntrain_data: synthetic:arithmetic_problems\nverifier: mathh\n"
                      f"output_dir: {tmp_path / 'o'}\n")
    one_line(["train", str(recipe)], capsys, "unknown verifier 'mathh'", "did you mean")


def _flips_files(tmp_path, with_correct: bool):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    rows = [(i, "7", "7", "8" if i < 2 else "7") for i in range(6)]
    old.write_text("".join(json.dumps({"id": i, "reference": r, "prediction": o,
                                       **({"correct": o == r} if with_correct else {})}) + "\n"
                           for i, r, o, _ in rows))
    new.write_text("".join(json.dumps({"id": i, "reference": r, "prediction": n,
                                       **({"correct": n == r} if with_correct else {})}) + "\n"
                           for i, r, _, n in rows))
    return old, new


def test_flips_unknown_verifier_and_a_verifier_that_did_not_judge(tmp_path, capsys):
    old, new = _flips_files(tmp_path, with_correct=True)
    base = ["flips", "--old", str(old), "--new", str(new), "--out", str(tmp_path / "rep"), "--bootstrap", "0",
            "--no_plot"]
    one_line([*base, "--verifier", "mathh"], capsys, "unknown verifier 'mathh'", "did you mean 'math' or 'match'?")
    assert not (tmp_path / "rep").exists()
    code, out, lines = run([*base, "--verifier", "math"], capsys)
    assert code == 0
    notes = [ln for ln in lines if "note:" in ln]
    assert len(notes) == 1 and "--verifier math did not judge correctness" in notes[0] and "'correct'" in notes[0]
    old, new = _flips_files(tmp_path, with_correct=False)  # predictions only: the verifier judges, no note
    code, out, lines = run([*base, "--verifier", "math"], capsys)
    assert code == 0 and not [ln for ln in lines if "note:" in ln]


def test_train_help_lists_the_keys(capsys):
    code, out, lines = run(["train", "--help"], capsys)
    assert code == 0 and not lines
    assert out.startswith("usage: alignkit train RECIPE.yaml|METHOD")
    assert "methods: dpo, npo, d2o, sft, perstep, kto" in out
    for method in ("dpo", "npo", "d2o", "sft", "perstep", "kto"):
        assert f"method {method} (" in out
    assert "  --beta (default 0.1): Strength of the KL constraint to the reference." in out
    assert "  --model_name_or_path (default 'tiny:qwen2'):" in out and "  --train_data (default" in out
    assert "  --verifier (default 'math'):" in out and "  --flip_guard_data (default None):" in out

    code, out, lines = run(["train", "dpo", "--help"], capsys)
    assert code == 0 and not lines
    assert "method dpo (DPOConfig, DPOTrainer):" in out and "method npo (" not in out
    assert "  --beta (default 0.1): Strength of the KL constraint to the reference." in out
    assert "  --max_length (default 1024):" in out  # AlignConfig's keys, under the method
    code, out_recipe, lines = run(["train", RECIPE, "--help"], capsys)  # a recipe: its method's keys
    assert code == 0 and out_recipe == out
    assert train_help("kto").count("method kto (") == 1


def test_train_says_where_it_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "run"
    code, out, lines = run(["train", RECIPE, "--max_steps", "1", "--output_dir", str(out_dir),
                            "--synthetic_train_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
                            "--logging_steps", "1"], capsys)
    assert code == 0, lines
    assert out.strip().splitlines()[-1] == (f"alignkit train: saved the model, tokenizer and model card README.md to "
                                            f"{out_dir.resolve()}")
    assert (out_dir / "model.safetensors").exists() and (out_dir / "README.md").exists()


def test_verify_shows_progress(tmp_path, capsys):
    rollouts = tmp_path / "r.jsonl"
    rows = [{"prompt": f"p{i}", "answer": "7", "completions": [{"text": "The answer is 7."}, {"text": "8"}]}
            for i in range(5)]
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, lines = run(["verify", "--input", str(rollouts), "--out", str(tmp_path / "v.jsonl"),
                            "--num_workers", "1"], capsys)
    assert code == 0
    err = "\n".join(lines)
    assert "verify (math)" in err and "10/10" in err  # the bar counts completions
    verified = [json.loads(ln) for ln in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [[c["correct"] for c in r["completions"]] for r in verified] == [[True, False]] * 5


def test_verify_with_progress_in_chunks_keeps_order(tmp_path):
    from alignkit.cli import verify_with_progress
    from alignkit.verifiers import get_verifier

    rows = [{"prompt": f"p{i}", "answer": str(i), "completions": [{"text": str(i)}, {"text": str(i + 1)}, {"text": "x"}]}
            for i in range(7)]
    verifier = get_verifier("math", num_workers=1)
    out = verify_with_progress(rows, list(range(1, 8)), verifier, num_workers=1, source="<test>", chunk_completions=4)
    assert [[c["correct"] for c in r["completions"]] for r in out] == [[True, False, False]] * 7
    assert [r["prompt"] for r in out] == [f"p{i}" for i in range(7)]


@pytest.mark.parametrize("argv", [["verify"], ["flips"], ["rollout"]])
def test_missing_required_arguments_are_argparse_usage(argv, capsys):
    code, out, lines = run(argv, capsys)
    assert code == 2 and lines[-1].startswith(f"alignkit {argv[0]}: error:")
