"""``alignkit rollout`` and ``alignkit verify``: a run split into steps through JSONL files."""

import json

from alignkit.cli import main
from alignkit.negatives import read_rollouts


def test_rollout_then_verify_writes_rows_pairs_and_negatives(tmp_path, tiny_model_path, capsys):
    prompts = tmp_path / "problems.jsonl"
    problems = [
        {"id": 1, "prompt": "Start with 2. Add 3. What is the result?", "answer": "5", "solution": "2 + 3 = 5\nThe answer is 5."},
        {"id": 2, "prompt": [{"role": "user", "content": "Start with 4. Multiply by 2."}], "answer": 8},
    ]
    prompts.write_text("".join(json.dumps(p) + "\n" for p in problems))
    rollouts, verified = tmp_path / "r.jsonl", tmp_path / "v.jsonl"
    assert main(["rollout", "--model", str(tiny_model_path), "--prompts", str(prompts), "-n", "3",
                 "--max_new_tokens", "6", "--seed", "1", "--out", str(rollouts)]) == 0
    assert "2 prompts x 3 = 6 completions" in capsys.readouterr().out
    rows = read_rollouts(rollouts)
    assert [r["id"] for r in rows] == [1, 2] and all(len(r["completions"]) == 3 for r in rows)
    assert all(len(c["logprobs"]) == len(c["token_ids"]) <= 6 for r in rows for c in r["completions"])

    assert main(["verify", "--verifier", "math", "--input", str(rollouts), "--out", str(verified),
                 "--pairs", str(tmp_path / "pairs.jsonl"), "--negatives", str(tmp_path / "neg.jsonl"),
                 "--summary_json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "prompts 2, completions 6" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    labelled = read_rollouts(verified, verified=True)
    n_correct = sum(c["correct"] for r in labelled for c in r["completions"])
    assert summary["completions"] == 6 and summary["correct"] == n_correct
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    # problem 1 has a solution to fall back on; problem 2 has none
    assert summary["pairs"] == len(pairs) and {p["id"] for p in pairs} <= {1, 2}
    negatives = (tmp_path / "neg.jsonl").read_text().splitlines()
    assert summary["negatives"] == len(negatives) >= 1


def test_synthetic_prompts_and_reproducible_seed(tmp_path, tiny_model_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        assert main(["rollout", "--model", str(tiny_model_path), "--prompts", "synthetic:arithmetic_problems",
                     "--limit", "3", "-n", "2", "--max_new_tokens", "5", "--seed", "7", "--out", str(out)]) == 0
    assert a.read_text() == b.read_text()
    rows = read_rollouts(a)
    assert len(rows) == 3 and all("answer" in r and "solution" in r for r in rows)


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completions": [{"text": "1"}]}\n{"completions": [{"text": "1"}]}\n')
    assert main(["verify", "--input", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 2" in err and "prompt" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_verifier_options_reach_the_verifier(tmp_path):
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"prompt": "Name a colour", "answer": "re+d", "completions": [{"text": "reed"}, {"text": "blue"}]}\n')
    out = tmp_path / "v.jsonl"
    assert main(["verify", "--verifier", "match", "--verifier_option", "mode=regex", "--input", str(rows), "--out", str(out)]) == 0
    assert [c["correct"] for c in read_rollouts(out)[0]["completions"]] == [True, False]
