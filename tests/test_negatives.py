"""Negatives builder: rollout rows, verdicts, statistics, DPO pairs with gold fallback, negatives sets."""

import json

import pytest

from alignkit.data.records import RecordError, validate_record
from alignkit.negatives import (
    RolloutStats,
    build_negatives,
    negative_records,
    preference_pairs,
    read_rollouts,
    sample_rollouts,
    verify_rollouts,
    write_jsonl,
)
from alignkit.rollout.base import SamplingConfig
from tests.fakes import LastNumberVerifier, ScriptedEngine

PROBLEMS = [
    {"id": "mixed", "prompt": "p1", "answer": "4", "solution": "2 + 2 = 4\nThe answer is 4."},
    {"id": "wrong", "prompt": "p2", "answer": "9", "solution": "3 * 3 = 9\nThe answer is 9."},
    {"id": "right", "prompt": "p3", "answer": "1"},
    {"id": "wrong-nosol", "prompt": "p4", "answer": "5"},
]
SCRIPT = {
    "p1": ["The answer is 4.", "The answer is 5.", "The answer is 6.", "The answer is 5."],
    "p2": ["The answer is 8.", "no idea"],
    "p3": ["1", "It is 1"],
    "p4": ["7"],
}


@pytest.fixture
def verified():
    rows, stats = build_negatives(ScriptedEngine(SCRIPT), LastNumberVerifier(), PROBLEMS, n=4)
    return rows, stats


def test_rows_keep_problem_fields_and_get_n_verdicts(verified):
    rows, _ = verified
    assert [r["id"] for r in rows] == ["mixed", "wrong", "right", "wrong-nosol"]
    assert all(len(r["completions"]) == 4 for r in rows)
    assert rows[0]["solution"] == PROBLEMS[0]["solution"]
    assert [c["correct"] for c in rows[0]["completions"]] == [True, False, False, False]
    assert rows[1]["completions"][1]["reason"] == "no answer found"
    assert rows[0]["completions"][1]["reason"] == "wrong answer: got 5, expected 4"
    assert set(rows[0]["completions"][0]) >= {"text", "token_ids", "logprobs", "finish_reason", "correct", "score", "reason"}


def test_statistics(verified):
    _, stats = verified
    assert (stats.prompts, stats.completions, stats.correct) == (4, 16, 5)
    assert (stats.all_wrong, stats.all_right, stats.mixed) == (2, 1, 1)
    assert stats.accuracy == pytest.approx(5 / 16) and stats.pass_at_n == pytest.approx(0.5)
    assert stats.reasons == {"wrong answer": 9, "no answer found": 2}
    assert "all wrong 2" in stats.format() and stats.to_dict()["accuracy"] == pytest.approx(5 / 16)


def test_preference_pairs_prefer_policy_then_gold(verified):
    rows, _ = verified
    pairs = preference_pairs(rows, pairs_per_prompt=3)
    by_id = {}
    for p in pairs:
        by_id.setdefault(p["id"], []).append(p)
        validate_record(p, "preference", source="t", row=1)
    # mixed: distinct wrong texts are "5" and "6" -> 2 pairs, both with the one correct response
    assert sorted(p["rejected"] for p in by_id["mixed"]) == ["The answer is 5.", "The answer is 6."]
    assert {p["chosen"] for p in by_id["mixed"]} == {"The answer is 4."}
    assert {p["chosen_source"] for p in by_id["mixed"]} == {"policy"}
    # all wrong with a solution: gold is chosen
    assert {p["chosen"] for p in by_id["wrong"]} == {PROBLEMS[1]["solution"]}
    assert {p["chosen_source"] for p in by_id["wrong"]} == {"solution"}
    # all right: no negative; all wrong without solution: no chosen
    assert "right" not in by_id and "wrong-nosol" not in by_id
    assert len(preference_pairs(rows, pairs_per_prompt=1)) == 2
    assert [p["id"] for p in preference_pairs(rows, fallback="none", pairs_per_prompt=5)] == ["mixed", "mixed"]


def test_negative_records_with_reference_samples(verified):
    rows, _ = verified
    negs = negative_records(rows)
    assert sorted((n["id"], n["rejected"]) for n in negs) == [
        ("mixed", "The answer is 5."), ("mixed", "The answer is 6."),
        ("wrong", "The answer is 8."), ("wrong", "no idea"), ("wrong-nosol", "7"),
    ]
    for n in negs:
        validate_record(n, "negatives", source="t", row=1)
    with_samples = negative_records(rows, samples="all", max_per_prompt=1)
    assert len(with_samples) == 3 and len(with_samples[0]["samples"]) == 4
    correct_only = negative_records(rows, samples="correct")
    assert [n.get("samples") for n in correct_only if n["id"] == "mixed"][0] == ["The answer is 4."]
    assert all("samples" not in n for n in correct_only if n["id"] != "mixed")


def test_jsonl_round_trip_and_split_steps(tmp_path):
    engine = ScriptedEngine(SCRIPT)
    sampling = SamplingConfig(max_new_tokens=5, seed=1)
    rows = sample_rollouts(engine, PROBLEMS, 2, sampling)
    assert engine.calls[0][1:] == (2, sampling)
    path = write_jsonl(rows, tmp_path / "r.jsonl")
    again = read_rollouts(path)
    assert again == json.loads(json.dumps(rows))
    with pytest.raises(RecordError, match="not verified"):
        read_rollouts(path, verified=True)
    verified = verify_rollouts(again, LastNumberVerifier())
    write_jsonl(verified, tmp_path / "v.jsonl")
    assert RolloutStats.of(read_rollouts(tmp_path / "v.jsonl", verified=True)).completions == 8


def test_bad_rollout_files_name_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completions": [{"text": "x"}]}\n{"prompt": "b", "completions": []}\n')
    with pytest.raises(RecordError) as e:
        read_rollouts(bad)
    assert "bad.jsonl" in str(e.value) and "row 2" in str(e.value) and "completions" in str(e.value)
    bad.write_text('{"prompt": "a", "completions": [{"text": 3}]}\n')
    with pytest.raises(RecordError, match=r"completions\[0\]\.text"):
        read_rollouts(bad)
    bad.write_text('{"prompt": "a", "completions": [{"text": "x"}]}\nnot json\n')
    with pytest.raises(RecordError, match="row 2"):
        read_rollouts(bad)
    with pytest.raises(ValueError, match="fallback"):
        preference_pairs([], fallback="gold")
