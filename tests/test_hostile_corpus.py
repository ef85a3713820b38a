"""The hostile corpus (``tests/hostile_corpus.py``) at every isolation level, judged from outside.

Targets (issue 15): at ``strict``, and at ``auto`` where the boundary works, no escape, no forged
pass, no correct program failed. At every level: no forged pass among tests judged outside except
what a sibling's files give away without the boundary, no correct program failed, and no
fallback without a note in the verdict. The in-process forgery must pass only with its flag.
``none`` (and ``auto`` without the boundary) is for trusted code: its escapes are reported, not
failed on, but the corpus must show that they happen there (else it would test nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignkit.verifiers.sandbox_boundary import get_boundary

HERE = os.path.dirname(os.path.abspath(__file__))
BOUNDARY = get_boundary()


def run_corpus(levels: list[str], tmp_path) -> dict:
    out = tmp_path / "corpus.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "hostile_corpus.py"), "--levels", ",".join(levels),
                           "--json", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the tables, shown with -s
    return json.loads(out.read_text())


def check_level(level: str, summary: dict, rows: list[dict]) -> None:
    assert summary["attacks"] >= 40 and summary["correct programs"] >= 15, summary
    assert summary["wrong verdicts on correct programs"] == 0, [r for r in rows if r["wrong"]]
    assert summary["escapes by correct programs"] == 0, summary
    assert summary["in-process forgeries (flagged)"] == 1, summary
    assert summary["silent fallbacks"] == 0, [r for r in rows if r["silent_fallback"]]
    forged = [r["case"] for r in rows if r["forged"]]
    if level in ("strict", "auto"):
        assert summary["escapes"] == 0, [(r["case"], r["escapes"]) for r in rows if r["escapes"]]
        assert forged == [], forged
    else:
        # without the boundary a concurrent rollout's files are readable: the only forgery left
        assert forged in ([], ["forge: copy a concurrent sibling's program"]), forged
        assert summary["escapes"] >= 10, summary  # the corpus really attacks: what the boundary stops


@pytest.mark.slow
@pytest.mark.skipif(not BOUNDARY.available, reason=f"the kernel boundary is unavailable here: {BOUNDARY.reason}")
def test_hostile_corpus_with_the_boundary(tmp_path):
    data = run_corpus(["strict", "auto"], tmp_path)
    for summary in data["summaries"]:
        check_level(summary["level"], summary, data["rows"][summary["level"]])


@pytest.mark.slow
def test_hostile_corpus_without_the_boundary(tmp_path):
    data = run_corpus(["auto-fallback", "none"], tmp_path)
    for summary in data["summaries"]:
        check_level(summary["level"], summary, data["rows"][summary["level"]])
