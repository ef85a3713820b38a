"""The flip report: prediction files in, flips.json / report.md / flips.png out, against hand-computed values."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignkit.data.records import RecordError
from alignkit.evaluation.flip_report import (
    compute_report,
    flip_report,
    judge,
    match_correct,
    read_flips_file,
    read_predictions,
    texts,
)
from alignkit.evaluation.flips import (
    bootstrap_ci,
    flip_count_bootstrap,
    flip_metrics,
    mcnemar_from_counts,
    mcnemar_test,
)
from alignkit.evaluation.flips_cli import flips_main
from alignkit.verifiers.match import MatchVerifier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Ten items, judged by the default verifier (match, normalized): old right on 0-5, new right on 0-3 and 6.
#   negative flips: q4, q5   positive flip: q6   new errors: q4, q5, q7, q8, q9
REFERENCE = ["Paris", "4", "blue", "42", "Rome", "7", "cat", "dog", "sun", "moon"]
OLD = ["paris.", "4", "Blue", " 42 ", "rome", "7", "dog", "cat", "star", "x"]
NEW = ["Paris", "4", "blue", "42", "Milan", "8", "CAT!", "cow", "star", "y"]
NEGATIVE_IDS = ["q4", "q5"]


def _write_jsonl(path: Path, rows, blank_lines=()) -> Path:
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in rows]
    for at in sorted(blank_lines, reverse=True):
        lines.insert(at, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _combined(tmp_path, **extra_cols) -> Path:
    rows = [
        {"id": f"q{i}", "reference": r, "old": o, "new": n, **{k: v[i] for k, v in extra_cols.items()}}
        for i, (r, o, n) in enumerate(zip(REFERENCE, OLD, NEW))
    ]
    return _write_jsonl(tmp_path / "flips.jsonl", rows)


def _pair_files(tmp_path, new_order=None, old_extra=None, new_extra=None) -> tuple[Path, Path]:
    old_rows = [{"id": f"q{i}", "reference": r, "prediction": o} for i, (r, o) in enumerate(zip(REFERENCE, OLD))]
    new_rows = [{"id": f"q{i}", "reference": r, "prediction": n} for i, (r, n) in enumerate(zip(REFERENCE, NEW))]
    for rows, extra in ((old_rows, old_extra), (new_rows, new_extra)):
        for row, values in zip(rows, zip(*extra.values()) if extra else []):
            row.update(dict(zip(extra.keys(), values)))
    if new_order is not None:
        new_rows = [new_rows[i] for i in new_order]
    return _write_jsonl(tmp_path / "old.jsonl", old_rows), _write_jsonl(tmp_path / "new.jsonl", new_rows)


def _check_hand_computed(flips: dict) -> None:
    d = flips["discrete"]
    assert flips["items"] == 10
    assert (d["negative_flips"], d["positive_flips"]) == (2, 1)
    assert d["nfr"] == pytest.approx(0.2) and d["pfr"] == pytest.approx(0.1)
    assert d["accuracy_old"] == pytest.approx(0.6) and d["accuracy_new"] == pytest.approx(0.5)
    assert d["accuracy_delta"] == pytest.approx(-0.1)
    assert d["nfi"] == pytest.approx(2 / 5)
    assert d["btc"] == pytest.approx(4 / 6)
    # NFR_mc: new wrong and prediction changed: q4, q5, q7 ("cat"->"cow"), q9 ("x"->"y"); q8 stayed "star"
    assert d["nfr_mc"] == pytest.approx(0.4)
    assert d["counts"] == {"kept_correct": 4, "negative_flips": 2, "positive_flips": 1, "kept_wrong": 3}
    assert d["mcnemar"]["p_value"] == pytest.approx(mcnemar_test([1] * 2 + [0], [0] * 2 + [1])["p_value"])
    assert d["mcnemar"]["p_value"] == pytest.approx(1.0)  # 2 vs 1 discordant: P = 2 * P(X <= 1 | 3, 1/2) = 1
    assert flips["negative_flip_ids"] == NEGATIVE_IDS
    assert flips["positive_flip_ids"] == ["q6"]
    assert flips["nfr"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------ through the CLI


def test_cli_on_a_flips_file_hand_computed(tmp_path, capsys):
    out = tmp_path / "report"
    rc = flips_main(["--predictions", str(_combined(tmp_path)), "--out", str(out), "--bootstrap", "500", "--show", "1"])
    assert rc == 0
    flips = json.loads((out / "flips.json").read_text())
    _check_hand_computed(flips)
    assert flips["settings"]["verifier"] == "match" and flips["settings"]["bootstrap"] == 500
    assert "multinomial" in flips["settings"]["ci_method"]
    lo, hi = flips["discrete"]["ci"]["nfr"]
    assert 0.0 <= lo <= 0.2 <= hi <= 0.6
    report = (out / "report.md").read_text()
    assert "## Negative flips (old right, new wrong): 2 items, first 1" in report
    assert "| q4 | Rome | rome | Milan |" in report  # --show 1: only the first negative flip is listed
    assert "q5" not in report.split("## Negative flips")[1].split("## Positive")[0]
    assert "| q6 | cat | dog | CAT! |" in report
    assert (out / "flips.png").read_bytes()[:8] == PNG_MAGIC
    stdout = capsys.readouterr().out
    assert "NFR (negative flip rate)" in stdout and "0.2000" in stdout


def test_max_nfr_exit_codes(tmp_path, capsys):
    path = str(_combined(tmp_path))
    assert flips_main(["--predictions", path, "--out", str(tmp_path / "a"), "--max-nfr", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "NFR 0.2000" in err and "above --max-nfr 0.1" in err and "2 of 10 items" in err
    assert flips_main(["--predictions", path, "--out", str(tmp_path / "b"), "--max-nfr", "0.25"]) == 0
    assert "passed" in capsys.readouterr().out
    assert flips_main(["--predictions", path, "--out", str(tmp_path / "c"), "--max_nfr", "0.2"]) == 0  # not above


def test_two_files_joined_on_id_in_any_order(tmp_path):
    old, new = _pair_files(tmp_path, new_order=[9, 3, 0, 5, 1, 7, 2, 8, 6, 4])
    out = tmp_path / "r"
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(out), "--no_plot"]) == 0
    flips = json.loads((out / "flips.json").read_text())
    _check_hand_computed(flips)
    assert flips["sources"] == {"old": str(old), "new": str(new)}
    assert not (out / "flips.png").exists()


def test_given_correct_booleans_win_over_the_verifier(tmp_path):
    # the new model's file says q0 is wrong although it matches: the given verdict is used
    new_correct = [False, True, True, True, False, False, True, False, False, False]
    old, new = _pair_files(tmp_path, new_extra={"correct": new_correct})
    report = flip_report(old=old, new=new, bootstrap=0)
    assert report.summary["discrete"]["negative_flips"] == 3
    assert report.to_dict()["negative_flip_ids"] == ["q0", "q4", "q5"]
    assert report.summary["settings"]["correctness"] == "new: given; old: verifier match"


def test_exact_mode_and_other_verifiers(tmp_path):
    path = _combined(tmp_path)
    exact = flip_report(predictions=path, verifier_options={"mode": "exact"}, bootstrap=0)
    # exact: old right on q1 ("4"), q5 ("7"); new right on q0, q1, q2, q3
    assert exact.summary["discrete"]["accuracy_old"] == pytest.approx(0.2)
    assert exact.summary["discrete"]["accuracy_new"] == pytest.approx(0.4)
    assert exact.to_dict()["negative_flip_ids"] == ["q5"]
    rows = [
        {"id": 1, "reference": "12", "old": "3 * 4 = 12\nThe answer is 12.", "new": "The answer is 13."},
        {"id": 2, "reference": "5", "old": "no idea", "new": "so \\boxed{5}"},
        {"id": 3, "reference": "0.5", "old": "The answer is 1/2.", "new": "The answer is 0.5"},
    ]
    p = _write_jsonl(tmp_path / "math.jsonl", rows)
    data = judge(read_flips_file(p), "math", {"num_workers": 1})
    assert data.old.correct.tolist() == [True, False, True]
    assert data.new.correct.tolist() == [False, True, True]
    assert data.correctness == "verifier math (num_workers=1)"


def test_nfr_mc_compares_the_verifiers_answers_not_the_wording(tmp_path):
    """The same wrong answer worded differently is no flip: with the math verifier NFR_mc counts only
    q3 (3 -> 7, both wrong), 1/4; comparing raw text (exact-match data) counts q1 too, 2/4."""
    rows = [
        {"id": "q1", "reference": "4", "old": "2 + 3 = 5\nThe answer is 5.", "new": r"So the total is $\boxed{5}$."},
        {"id": "q2", "reference": "6", "old": "The answer is 6.", "new": "3 + 3 = 6\n#### 6"},
        {"id": "q3", "reference": "2", "old": "The answer is 3.", "new": "The answer is 7."},
        {"id": "q4", "reference": r"\frac{1}{2}", "old": r"$\frac{1}{2}$", "new": "The answer is 0.5."},
    ]
    path = _write_jsonl(tmp_path / "worded.jsonl", rows)
    by_math = flip_report(predictions=path, verifier="math", verifier_options={"num_workers": 1}, bootstrap=200)
    d = by_math.summary["discrete"]
    assert (d["accuracy_old"], d["accuracy_new"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert d["nfr_mc"] == pytest.approx(0.25)
    assert by_math.data.changed.tolist() == [False, False, True, False]
    assert d["ci"]["nfr_mc"][0] <= 0.25 <= d["ci"]["nfr_mc"][1]
    raw = flip_metrics(by_math.data.old.correct, by_math.data.new.correct, [r["old"] for r in rows],
                       [r["new"] for r in rows])
    assert raw.nfr_mc == pytest.approx(0.5)
    # given correctness, exact-match data: the raw text decides
    given = [{**r, "old_correct": c_old, "new_correct": c_new}
             for r, c_old, c_new in zip(rows, [False, True, False, True], [False, True, False, True])]
    exact = flip_report(predictions=_write_jsonl(tmp_path / "given.jsonl", given),
                        verifier_options={"mode": "exact"}, bootstrap=0)
    assert exact.summary["discrete"]["nfr_mc"] == pytest.approx(0.5)


def test_nfr_mc_with_the_default_match_verifier_ignores_case_and_spacing(tmp_path):
    rows = [{"id": 1, "reference": "paris", "old": "Rome", "new": " rome. "},
            {"id": 2, "reference": "paris", "old": "Rome", "new": "Milan"}]
    report = flip_report(predictions=_write_jsonl(tmp_path / "m.jsonl", rows), bootstrap=0)
    assert report.data.changed.tolist() == [False, True]
    assert report.summary["discrete"]["nfr_mc"] == pytest.approx(0.5)


def test_identical_predictions_give_nfr_zero(tmp_path):
    rows = [{"id": i, "reference": str(i % 3), "old": str(i % 2), "new": str(i % 2)} for i in range(50)]
    out = tmp_path / "r"
    assert flips_main(["--predictions", str(_write_jsonl(tmp_path / "same.jsonl", rows)), "--out", str(out),
                       "--max-nfr", "0"]) == 0
    flips = json.loads((out / "flips.json").read_text())
    assert flips["discrete"]["nfr"] == 0 and flips["discrete"]["pfr"] == 0 and flips["discrete"]["nfr_mc"] == 0
    assert flips["discrete"]["btc"] == 1.0 and flips["negative_flip_ids"] == []
    assert flips["discrete"]["mcnemar"]["p_value"] == 1.0
    assert "## Negative flips (old right, new wrong): 0 items" in (out / "report.md").read_text()


def test_continuous_scores(tmp_path):
    old = [0.9, 0.5, 0.2, 0.7, 0.4, 0.6]
    new = [0.5, 0.55, 0.6, 0.7, 0.1, 0.65]
    # deltas: -0.4, +0.05, +0.4, 0, -0.3, +0.05 -> with threshold 0.1: regressions s0, s4; gains s2
    rows = [{"id": f"s{i}", "reference": "r", "old_score": o, "new_score": n} for i, (o, n) in enumerate(zip(old, new))]
    out = tmp_path / "r"
    rc = flips_main(["--predictions", str(_write_jsonl(tmp_path / "s.jsonl", rows)), "--out", str(out),
                     "--threshold", "0.1", "--max-nfr", "0.3"])
    assert rc == 1  # score NFR 2/6 > 0.3
    flips = json.loads((out / "flips.json").read_text())
    s = flips["scores"]
    assert "discrete" not in flips and flips["nfr_basis"] == "scores"
    assert s["nfr"] == pytest.approx(2 / 6) and s["pfr"] == pytest.approx(1 / 6)
    assert s["mean_regression"] == pytest.approx(0.35) and s["mean_gain"] == pytest.approx(0.4)
    assert s["mean_delta"] == pytest.approx(np.mean(np.subtract(new, old)))
    assert (s["regressions"], s["gains"]) == (2, 1)
    assert flips["score_regression_ids"] == ["s0", "s4"]
    lo, hi = s["ci"]["mean_delta"]
    assert lo < s["mean_delta"] < hi
    report = (out / "report.md").read_text()
    assert "## Score regressions (delta < -0.1): 2 items, largest first" in report
    assert report.index("| s0 |") < report.index("| s4 |")  # -0.4 before -0.3
    assert (out / "flips.png").read_bytes()[:8] == PNG_MAGIC


def test_scores_that_are_the_verdicts_are_not_repeated(tmp_path):
    old, new = _pair_files(
        tmp_path,
        old_extra={"correct": [True] * 6 + [False] * 4, "score": [1.0] * 6 + [0.0] * 4},
        new_extra={"correct": [True] * 4 + [False, False, True] + [False] * 3, "score": [1] * 4 + [0, 0, 1] + [0] * 3},
    )
    report = flip_report(old=old, new=new, bootstrap=0)
    assert "scores" not in report.summary and report.summary["discrete"]["nfr"] == pytest.approx(0.2)
    old2, new2 = _pair_files(tmp_path, old_extra={"score": [0.5] * 10}, new_extra={"score": [0.25] * 10})
    both = flip_report(old=old2, new=new2, bootstrap=0)
    assert both.summary["scores"]["nfr"] == 1.0 and both.summary["discrete"]["nfr"] == pytest.approx(0.2)
    assert both.nfr == pytest.approx(0.2) and both.summary["nfr_basis"] == "discrete"  # auto: correctness first
    out = tmp_path / "gate"
    argv = ["--old", str(old2), "--new", str(new2), "--out", str(out), "--max-nfr", "0.5", "--no_plot"]
    assert flips_main(argv) == 0
    assert flips_main(argv + ["--nfr_basis", "scores"]) == 1  # every score fell
    assert json.loads((out / "flips.json").read_text())["nfr_basis"] == "scores"


def test_subprocess_module_entry_point(tmp_path):
    old, new = _pair_files(tmp_path)
    out = tmp_path / "r"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit.evaluation.flips_cli", "--old", str(old), "--new", str(new),
         "--out", str(out), "--max-nfr", "0.1"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "NFR (negative flip rate)" in proc.stdout and "above --max-nfr 0.1" in proc.stderr
    _check_hand_computed(json.loads((out / "flips.json").read_text()))


# ------------------------------------------------------------------------------------ errors


def test_join_errors_name_file_row_and_id(tmp_path):
    old, new = _pair_files(tmp_path)
    rows = [json.loads(line) for line in new.read_text().splitlines()]
    # new lacks q3: the old file's row 4 is named
    _write_jsonl(new, rows[:3] + rows[4:])
    with pytest.raises(RecordError) as e:
        read_predictions(old, new)
    assert (e.value.source, e.value.row, e.value.field) == (str(old), 4, "id")
    assert "'q3' is not in" in str(e.value)
    # an id only in new (after a blank line: rows are line numbers)
    _write_jsonl(new, rows + [{"id": "extra", "reference": "x", "prediction": "x"}], blank_lines=[2])
    with pytest.raises(RecordError) as e:
        read_predictions(old, new)
    assert (e.value.source, e.value.row, e.value.field) == (str(new), 12, "id")
    assert "'extra' is not in" in str(e.value)
    # a duplicated id: the second occurrence is named, with the first
    _write_jsonl(new, rows[:6] + [rows[1]] + rows[6:])
    with pytest.raises(RecordError, match=r"row 7, field 'id': duplicate id 'q1' \(first at row 2\)") as e:
        read_predictions(old, new)
    assert e.value.source == str(new)
    # the same id on two lines of a flips file
    combined = [json.loads(line) for line in _combined(tmp_path).read_text().splitlines()]
    p = _write_jsonl(tmp_path / "dup.jsonl", combined + [combined[0]])
    with pytest.raises(RecordError, match=r"row 11, field 'id': duplicate id 'q0' \(first at row 1\)"):
        read_flips_file(p)
    # the files disagree on a reference
    rows[2]["reference"] = "green"
    _write_jsonl(new, rows)
    with pytest.raises(RecordError, match=r"row 3, field 'reference': 'green' differs from 'blue'"):
        read_predictions(old, new)


@pytest.mark.parametrize(
    "bad_row, field, message",
    [
        ({"id": "q2", "reference": "x", "old": "a", "new": "b", "old_score": "high", "new_score": 1}, "old_score", "expected a number"),
        ({"id": "q2", "reference": "x", "old": "a"}, "new", "missing field"),
        ({"id": 2.5, "reference": "x", "old": "a", "new": "b"}, "id", "expected str or int"),
        ({"id": "q2", "old": "a", "new": "b"}, "reference", "missing required field"),
        ({"id": "q2", "reference": "x", "old": "a", "new": "b", "old_correct": "yes", "new_correct": True}, "old_correct", "expected true or false"),
        ({"id": "q2", "reference": "x", "old_score": float("nan"), "new_score": 1.0}, "old_score", "NaN"),
    ],
)
def test_malformed_flips_rows_name_file_row_and_field(tmp_path, bad_row, field, message):
    good = {"id": "q1", "reference": "x", "old": "a", "new": "b"}
    if "old_score" in bad_row and "old" not in bad_row:
        good = {"id": "q1", "reference": "x", "old_score": 0.5, "new_score": 0.5}
    rows = [good, dict(good, id="q0"), bad_row]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows, blank_lines=[1])  # the bad row is on line 4
    with pytest.raises(RecordError) as e:
        read_flips_file(path)
    assert (e.value.source, e.value.row, e.value.field) == (str(path), 4, field)
    assert message in e.value.message


def test_malformed_rows_through_the_cli(tmp_path, capsys):
    old, new = _pair_files(tmp_path)
    lines = new.read_text().splitlines()
    lines[5] = '{"id": "q5", "reference": "7", "prediction": "8", "score": "high"}'
    new.write_text("\n".join(lines) + "\n")
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{new}, row 6, field 'score': expected a number" in err
    lines[5] = '{"id": "q5", "reference": "7", "prediction": "8"'  # not JSON
    new.write_text("\n".join(lines) + "\n")
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(tmp_path / "r")]) == 2
    assert f"{new}, row 6: invalid JSON" in capsys.readouterr().err
    lines[5] = '{"id": "q5", "reference": "7"}'  # nothing to compare
    new.write_text("\n".join(lines) + "\n")
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(tmp_path / "r")]) == 2
    assert "row 6: prediction records need 'prediction', 'correct' or 'score'" in capsys.readouterr().err
    # a row that lacks a field the other rows have
    lines[5] = '{"id": "q5", "reference": "7", "score": 1.0}'
    new.write_text("\n".join(lines) + "\n")
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(tmp_path / "r")]) == 2
    assert "row 6, field 'prediction': missing field (row 1 has it" in capsys.readouterr().err
    assert flips_main(["--old", str(old), "--new", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "no such prediction file" in capsys.readouterr().err
    new.write_text("\n")
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(tmp_path / "r")]) == 2
    assert f"{new}: no records" in capsys.readouterr().err


def test_mixed_value_types_take_the_row_by_row_path(tmp_path):
    # Arrow cannot type a column that mixes numbers and strings; the row-by-row read handles it
    rows = [
        {"id": 1, "reference": 4, "old": "4", "new": 4},
        {"id": "two", "reference": "x", "old": "X", "new": ["x"]},
        {"id": 3, "reference": 2.5, "old": "2.5", "new": 2.0},
    ]
    data = judge(read_flips_file(_write_jsonl(tmp_path / "m.jsonl", rows)))
    assert isinstance(data.ids, list) and data.ids == [1, "two", 3]
    assert data.old.correct.tolist() == [True, True, True]
    assert data.new.correct.tolist() == [True, False, False]  # ["x"] is the text '["x"]'


# ------------------------------------------------------------------------------------ vectorised pieces


def test_vectorised_match_agrees_with_the_match_verifier():
    import pyarrow as pa

    cases = [
        ("Paris", "paris."), ("  Paris. ", "paris"), ("a . .", "a ."), ("a\x1cb", "a b"), ("a\x0bb", "a b"),
        ("STRASSE", "straße"), ("Straße", "strasse"), ("ÉTÉ", "été"), ("x!?", "x"), ("x", "x "), ("", ""),
        ("1,234", "1234"), ("tab\there", "tab here"), ("Ǆ", "ǆ"), ("end。", "end"), ("a|b", "A|B"), ("\n", ""),
    ]
    preds, refs = [c[0] for c in cases], [c[1] for c in cases]
    for mode in ("normalized", "exact"):
        verifier = MatchVerifier(mode=mode)
        expected = [verifier.verify({"answer": r}, p).correct for p, r in zip(preds, refs)]
        got = match_correct(pa.array(preds), pa.array(refs), mode)
        assert got.tolist() == expected, mode


def test_count_bootstrap_matches_the_item_bootstrap():
    rng = np.random.default_rng(3)
    old, new = rng.random(300) < 0.7, rng.random(300) < 0.75
    op, np_ = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    fast = flip_count_bootstrap(old, new, op != np_, samples=3000, seed=1)
    for key in ("nfr", "nfi", "btc", "accuracy_delta", "nfr_mc"):
        slow = bootstrap_ci(lambda *a, k=key: getattr(flip_metrics(*a), k), old, new, op, np_, samples=3000, seed=2)
        assert fast[key] == pytest.approx(slow, abs=0.015), key
    for b, c in [(0, 0), (3, 1), (17, 40), (1200, 1290)]:
        o = np.array([1] * b + [0] * c + [1], bool)
        n = np.array([0] * b + [1] * c + [1], bool)
        assert mcnemar_from_counts(b, c)["p_value"] == pytest.approx(mcnemar_test(o, n)["p_value"], rel=1e-9)


def test_fast_path_agrees_with_direct_metrics_on_a_larger_file(tmp_path):
    rnd = random.Random(0)
    rows, refs, olds, news = [], [], [], []
    for i in range(5000):
        ref = str(rnd.randint(0, 20))
        old = ref if rnd.random() < 0.6 else str(rnd.randint(0, 20))
        new = (ref.upper() + " ") if rnd.random() < 0.65 else str(rnd.randint(0, 20))
        rows.append({"id": i, "reference": ref, "old": old, "new": new})
        refs.append(ref), olds.append(old), news.append(new)
    path = _write_jsonl(tmp_path / "big.jsonl", rows)
    report = compute_report(judge(read_flips_file(path)), bootstrap=100)
    v = MatchVerifier()
    old_ok = [v.verify({"answer": r}, o).correct for r, o in zip(refs, olds)]
    new_ok = [v.verify({"answer": r}, n).correct for r, n in zip(refs, news)]
    expected = flip_metrics(old_ok, new_ok, olds, news)
    d = report.summary["discrete"]
    assert (d["negative_flips"], d["positive_flips"]) == (expected.negative_flips, expected.positive_flips)
    assert d["nfr"] == pytest.approx(expected.nfr) and d["nfr_mc"] == pytest.approx(expected.nfr_mc)
    assert report.to_dict()["negative_flip_ids"] == [i for i in range(5000) if old_ok[i] and not new_ok[i]]
    assert texts(report.data.ids).to_pylist()[:3] == ["0", "1", "2"]


def test_without_matplotlib_the_png_is_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now raises ImportError
    from alignkit.evaluation.flip_report import write_report

    report = flip_report(predictions=_combined(tmp_path), bootstrap=0)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        paths = write_report(report, tmp_path / "r")
    assert "png" not in paths and not (tmp_path / "r" / "flips.png").exists()
    assert "flips.png" not in (tmp_path / "r" / "report.md").read_text()
    assert json.loads((tmp_path / "r" / "flips.json").read_text())["negative_flip_ids"] == NEGATIVE_IDS


def test_score_intervals_switch_to_the_normal_approximation_for_large_inputs():
    from alignkit.evaluation.flips import score_flip_bootstrap

    rng = np.random.default_rng(0)
    old, new = rng.random(20_000), rng.random(20_000)
    ci, method = score_flip_bootstrap(old, new, 0.1, samples=1000)  # 2e7 item draws > max_work
    d = new - old
    half = 1.959964 * d.std(ddof=1) / np.sqrt(d.size)
    assert method.startswith("normal approximation")
    assert ci["mean_delta"] == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-5)
    small, method = score_flip_bootstrap(old[:500], new[:500], 0.1, samples=1000)
    assert method.startswith("percentile bootstrap")
    lo, hi = small["mean_delta"]
    assert lo < d[:500].mean() < hi
    assert small["nfr"][0] < np.mean(d[:500] < -0.1) < small["nfr"][1]


# ------------------------------------------------------------------------------------ fast paths


def test_key_permutation_matches_index_in():
    """The hashed id join gives Arrow's index_in permutation (string and large_string, sliced arrays,
    mixed lengths, NUL bytes, non-ASCII), and declines (None) on a duplicated, missing or too long key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from alignkit.evaluation.flip_readers import KeyHashes, key_permutation

    rng = random.Random(0)
    for trial in range(60):
        keys = sorted({"".join(rng.choice("ab\x00é7") for _ in range(rng.randint(0, 20))) for _ in range(rng.randint(1, 40))})
        shuffled = keys[:]
        rng.shuffle(shuffled)
        kind = pa.large_string() if trial % 2 else pa.string()
        old = pa.array(["pad"] + keys, kind).slice(1) if trial % 3 == 0 else pa.array(keys, kind)
        new = pa.array(shuffled, kind)
        order = key_permutation(old, new)
        assert order is not None and order.tolist() == pc.index_in(old, value_set=new).to_pylist()
        if len(keys) > 1:
            duplicated = pa.array([shuffled[1]] + shuffled[1:], kind)
            assert key_permutation(old, duplicated) is None and KeyHashes.of(duplicated).sorted_distinct() is None
            assert key_permutation(old, pa.array(shuffled[:-1] + ["other"], kind)) is None
    long = pa.array(["x" * 65, "y"])
    assert KeyHashes.of(long) is None and key_permutation(long, long) is None


def test_join_of_shuffled_files_and_changed_answers(tmp_path):
    """Two shuffled prediction files join as in order; the changed answers that judge derives from the
    verdicts equal answers_changed's direct comparison (normalized and exact)."""
    from alignkit.evaluation.flip_report import answers_changed

    rng = random.Random(1)
    words = ["Paris", " paris. ", "PARIS!", "rome", "Rome", "straße", "STRASSE", "été", "4", " 4 ", "5", "a  b", "A\tb."]
    rows = [{"id": f"i{i}" if i % 3 else i, "reference": rng.choice(words)} for i in range(300)]
    old_rows = [{**r, "prediction": rng.choice(words)} for r in rows]
    new_rows = [{**r, "prediction": rng.choice(words)} for r in rows]
    old = _write_jsonl(tmp_path / "old.jsonl", old_rows)
    in_order = _write_jsonl(tmp_path / "new.jsonl", new_rows)
    shuffled = new_rows[:]
    rng.shuffle(shuffled)
    new = _write_jsonl(tmp_path / "new_shuffled.jsonl", shuffled)
    a, b = read_predictions(old, in_order), read_predictions(old, new)
    assert texts(b.new.prediction).to_pylist() == texts(a.new.prediction).to_pylist()
    for options in ({}, {"mode": "exact"}):
        judged = judge(b, "match", options)
        direct = answers_changed(judged, "match", options)
        assert judged.changed.tolist() == direct.tolist()
        assert judged.changed.any() and not judged.changed.all()
