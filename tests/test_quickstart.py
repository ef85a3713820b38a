"""``alignkit quickstart --tiny --fast``: every stage runs on a tiny model and writes its outputs; the flip
report agrees with the saved old/new predictions. The real-model quickstart: tests/test_quickstart_real.py."""

import json

import pytest

from alignkit.cli import main


@pytest.mark.slow
def test_quickstart_fast_runs_every_stage_and_the_flip_report_matches_the_predictions(tmp_path, capsys):
    assert main(["quickstart", "--tiny", "--fast", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for k in range(1, 8):
        assert f"[{k}/7]" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    old = [json.loads(line) for line in (tmp_path / "old_predictions.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (tmp_path / "new_predictions.jsonl").read_text().splitlines()]
    assert len(old) == len(new) == summary["settings"]["eval_problems"] == 32
    assert [o["id"] for o in old] == [n["id"] for n in new]
    negative = [o["id"] for o, n in zip(old, new) if o["correct"] and not n["correct"]]
    flips = json.loads((tmp_path / "flip_report" / "flips.json").read_text())
    assert flips["negative_flip_ids"] == negative
    assert summary["flips"]["nfr"] == pytest.approx(len(negative) / 32) == pytest.approx(flips["nfr"])
    assert (tmp_path / "flip_report" / "report.md").read_text().startswith("# Negative flip report")
    assert summary["accuracy"]["sft"] == pytest.approx(sum(o["correct"] for o in old) / 32)
    # the SFT model and the updated model are saved and the round's rollouts are verified
    assert (tmp_path / "sft" / "model.safetensors").exists()
    assert (tmp_path / "onpolicy_dpo" / "round_0" / "model" / "model.safetensors").exists()
    rollouts = [json.loads(line) for line in (tmp_path / "onpolicy_dpo" / "round_0" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 32 and all(isinstance(c["correct"], bool) for r in rollouts for c in r["completions"])
