"""The flip report at a glance (issue 18, item 5): the 2×2 old × new table (McNemar view) in report.md and the
terminal summary, the model names, the --max-nfr budget and the gate's verdict in report.md and flips.json,
accuracy and NFR with their intervals in flips.png, and the flip guard's NFR and accuracy over training steps
(flip_guard.png, and a report section)."""

from __future__ import annotations

import json
import statistics

import pytest

from alignkit.evaluation.flip_render import (
    contingency_table,
    flip_figure,
    flip_guard_figure,
    gate_line,
    plot_flip_guard,
)
from alignkit.evaluation.flip_report import flip_report
from alignkit.evaluation.flips_cli import flips_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 10 items: old right on 0-5; new right on 0-3 and 6 -> kept right 4, negative flips 2 (4, 5), positive 1 (6),
# kept wrong 3 (7, 8, 9)
OLD_RIGHT = {0, 1, 2, 3, 4, 5}
NEW_RIGHT = {0, 1, 2, 3, 6}


def _files(tmp_path, old_name="base_predictions.jsonl", new_name="dpo_predictions.jsonl"):
    old, new = tmp_path / old_name, tmp_path / new_name
    old.write_text("".join(json.dumps({"id": i, "reference": str(i), "prediction": str(i) if i in OLD_RIGHT else "x"})
                           + "\n" for i in range(10)))
    new.write_text("".join(json.dumps({"id": i, "reference": str(i), "prediction": str(i) if i in NEW_RIGHT else "y"})
                           + "\n" for i in range(10)))
    return old, new


def _guard_history(stopped_at=None):
    rows = [(5, 0.0, 0.1, 0.6), (10, 0.1, 0.2, 0.7), (15, 0.3, 0.2, 0.5)]
    return {"action": "best", "max_nfr": 0.15, "items": 10, "accuracy_old": 0.6, "eval_steps": 5,
            "history": [{"step": s, "nfr": n, "pfr": p, "nfr_mc": n, "accuracy": a, "accuracy_old": 0.6,
                         "negative_flips": round(n * 10), "positive_flips": round(p * 10), "within_budget": n <= 0.15}
                        for s, n, p, a in rows],
            "best": {"step": 10, "accuracy": 0.7, "nfr": 0.1, "pfr": 0.2, "path": "run/flip_guard_best"},
            "stopped_at": stopped_at}


def test_report_md_has_the_table_names_budget_and_verdict(tmp_path, capsys):
    old, new = _files(tmp_path)
    out = tmp_path / "rep"
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(out), "--max-nfr", "0.1",
                       "--bootstrap", "200"]) == 1
    report = (out / "report.md").read_text()
    assert report.startswith("# Negative flip report: base → dpo\n")
    assert "Old model: **base**; new model: **dpo**." in report
    assert ("## Gate\n\n**FAILED: NFR 0.2000 (discrete) is above the budget --max-nfr 0.1: 2 of 10 items regressed "
            "(negative flips; their ids are in flips.json)**") in report
    assert ("| old (base) / new (dpo) | new right | new wrong | total |\n| --- | ---: | ---: | ---: |\n"
            "| old right | 4 | 2 (negative flips) | 6 |\n"
            "| old wrong | 1 (positive flips) | 3 | 4 |\n"
            "| total | 5 | 5 | 10 |") in report
    assert "McNemar's exact test on them: p = 1" in report  # 2 vs 1 discordant: p = 1
    flips = json.loads((out / "flips.json").read_text())
    assert flips["models"] == {"old": "base", "new": "dpo"}
    assert flips["gate"] == {"max_nfr": 0.1, "nfr": 0.2, "basis": "discrete", "passed": False, "regressed": 2,
                             "items": 10}
    stdout = capsys.readouterr().out
    assert "old: base  ->  new: dpo" in stdout
    table = [ln.split() for ln in stdout.splitlines() if ln.startswith(("old right", "old wrong"))]
    assert table == [["old", "right", "4", "2", "(negative", "flips)", "6"],
                     ["old", "wrong", "1", "(positive", "flips)", "3", "4"]]
    assert "gate: FAILED: NFR 0.2000 (discrete) is above the budget --max-nfr 0.1" in stdout

    # within the budget, named by the user
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(out), "--max-nfr", "0.2", "--bootstrap", "0",
                       "--old_name", "SmolLM2 base", "--new_name", "SmolLM2 + DPO", "--no_plot"]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# Negative flip report: SmolLM2 base → SmolLM2 + DPO\n")
    assert ("**PASSED: NFR 0.2000 (discrete) is within the budget --max-nfr 0.2 (2 negative flips of 10 items)**"
            in report)
    assert json.loads((out / "flips.json").read_text())["gate"]["passed"] is True
    # no budget: said so, no verdict
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(out), "--bootstrap", "0", "--no_plot"]) == 0
    report = (out / "report.md").read_text()
    assert "No NFR budget given" in report and "## Gate" not in report
    assert "gate" not in json.loads((out / "flips.json").read_text())


def test_model_names_of_models_and_files(tmp_path):
    old, new = _files(tmp_path)
    report = flip_report(old=old, new=new, bootstrap=0)
    assert report.summary["models"] == {"old": "base", "new": "dpo"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_old, _ = _files(tmp_path / "a", "preds.jsonl", "x.jsonl")
    _, b_new = _files(tmp_path / "b", "y.jsonl", "preds.jsonl")
    assert flip_report(old=a_old, new=b_new, bootstrap=0).summary["models"] == {"old": "old: preds", "new": "new: preds"}
    named = flip_report(old=old, new=new, bootstrap=0, old_name="v1", new_name="v2", max_nfr=0.5)
    assert named.summary["models"] == {"old": "v1", "new": "v2"} and named.summary["gate"]["passed"]
    assert contingency_table(named)[1:] == [["old right", "4", "2 (negative flips)", "6"],
                                            ["old wrong", "1 (positive flips)", "3", "4"],
                                            ["total", "5", "5", "10"]]
    assert gate_line(flip_report(old=old, new=new, bootstrap=0)) is None


def test_the_picture_draws_the_table_and_the_intervals(tmp_path):
    old, new = _files(tmp_path)
    report = flip_report(old=old, new=new, bootstrap=300, max_nfr=0.1)
    fig = flip_figure(report)
    assert fig._suptitle.get_text() == "base → dpo (10 items); gate NFR <= 0.1: FAILED"
    table, rates = fig.axes
    cells = sorted(t.get_text() for t in table.texts)
    assert cells == sorted(["4\nkept right", "2\nnegative flips", "1\npositive flips", "3\nkept wrong"])
    assert [t.get_text() for t in rates.get_yticklabels()] == ["PFR", "NFR", "accuracy new", "accuracy old"]
    ci = report.summary["discrete"]["ci"]
    labels = {t.get_text() for t in rates.texts}
    for key, value in (("accuracy_old", 0.6), ("accuracy_new", 0.5), ("nfr", 0.2), ("pfr", 0.1)):
        lo, hi = ci[key]
        assert f"{value:.3f} [{lo:.3f}, {hi:.3f}]" in labels  # each rate with its interval
    bars = [c for c in rates.containers]  # one errorbar per rate, spanning its interval
    spans = sorted(tuple(round(x, 6) for x in seg.get_segments()[0][:, 0]) for c in bars for seg in c.lines[2])
    assert spans == sorted(tuple(round(x, 6) for x in ci[k]) for k in ("accuracy_old", "accuracy_new", "nfr", "pfr"))
    budget = [ln for ln in rates.get_lines() if ln.get_linestyle() == "--"]
    assert len(budget) == 1 and list(budget[0].get_xdata()) == [0.1, 0.1]
    assert "--max-nfr 0.1" in labels
    # the CLI writes it
    out = tmp_path / "rep"
    flips_main(["--old", str(old), "--new", str(new), "--out", str(out), "--bootstrap", "100"])
    assert (out / "flips.png").read_bytes()[:8] == PNG_MAGIC
    assert "![old × new counts, accuracy and NFR with their intervals](flips.png)" in (out / "report.md").read_text()


def test_flip_guard_history_plot_and_report_section(tmp_path):
    history = _guard_history()
    fig = flip_guard_figure(history)
    acc, rates = fig.axes
    lines = {ln.get_label(): ln for ln in rates.get_lines()}
    assert list(lines["NFR"].get_xdata()) == [5, 10, 15] and list(lines["NFR"].get_ydata()) == [0.0, 0.1, 0.3]
    assert list(lines["PFR"].get_ydata()) == [0.1, 0.2, 0.2]
    assert list(lines["budget 0.15"].get_ydata()) == [0.15, 0.15]
    acc_lines = {ln.get_label(): ln for ln in acc.get_lines()}
    assert list(acc_lines["accuracy"].get_ydata()) == [0.6, 0.7, 0.5]
    assert list(acc_lines["starting model"].get_ydata()) == [0.6, 0.6]
    assert list(acc_lines["best"].get_xdata()) == [10, 10]
    assert "stopped" in {ln.get_label() for ln in flip_guard_figure(_guard_history(stopped_at=15)).axes[0].get_lines()}
    assert plot_flip_guard({**history, "history": []}, tmp_path / "none.png") is None  # nothing to draw yet

    guard = tmp_path / "run" / "flip_guard.json"
    guard.parent.mkdir()
    guard.write_text(json.dumps(history))
    old, new = _files(tmp_path)
    out = tmp_path / "rep"
    assert flips_main(["--old", str(old), "--new", str(new), "--out", str(out), "--bootstrap", "0",
                       "--flip_guard", str(guard.parent)]) == 0
    assert (out / "flip_guard.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    section = report.split("## Flip guard during training")[1]
    assert "10 held-out items, evaluated every 5 steps; starting accuracy 0.6000; action best, budget NFR <= 0.15." \
        in section
    assert "![flip guard: NFR and accuracy over training steps](flip_guard.png)" in section
    assert "| 10 | 0.7000 | 0.1000 | 0.2000 | 1 | yes |" in section and "| 15 | 0.5000 | 0.3000 | 0.2000 | 3 | no |" \
        in section
    assert "Best within the budget: step 10" in section


def test_flip_guard_missing_history_is_one_line(tmp_path, capsys):
    old, new = _files(tmp_path)
    rc = flips_main(["--old", str(old), "--new", str(new), "--out", str(tmp_path / "r"), "--flip_guard",
                     str(tmp_path / "nowhere")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("alignkit flips: error: no flip guard history") and len(err) == 1


def test_the_flip_guard_draws_its_history_next_to_it(tmp_path):
    from alignkit.evaluation.flip_guard import FlipGuardCallback

    guard = FlipGuardCallback([{"prompt": "Start with 3. Add 4.", "answer": "7"}], output_dir=str(tmp_path),
                              max_nfr=0.15, action="best")
    guard.baseline = [True]
    guard._write_history(None)
    assert (tmp_path / "flip_guard.json").exists() and not (tmp_path / "flip_guard.png").exists()  # no step yet
    guard.history = _guard_history()["history"]
    guard._write_history(None)
    assert (tmp_path / "flip_guard.png").read_bytes()[:8] == PNG_MAGIC


def test_normal_quantile_is_the_standard_library_one():
    from alignkit.evaluation.flips import score_flip_bootstrap

    import numpy as np

    old, new = np.zeros(5000), np.linspace(-1, 1, 5000)
    ci, how = score_flip_bootstrap(old, new, 0.0, samples=100, confidence=0.9, max_work=10)
    assert how.startswith("normal approximation")
    d = new - old
    half = statistics.NormalDist().inv_cdf(0.95) * d.std(ddof=1) / np.sqrt(d.size)
    assert ci["mean_delta"] == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
