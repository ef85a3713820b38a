"""``alignkit quickstart --fast`` on the real model (SmolLM2-135M-Instruct): every stage runs, the rollouts
are real chat answers (not empty), the LoRA adapter is saved, and the flip report agrees with the saved
old/new predictions."""

import json

import pytest

from alignkit.cli import main

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_real_quickstart_fast(tmp_path, capsys):
    assert main(["quickstart", "--fast", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for k in range(1, 7):
        assert f"[{k}/6]" in out
    assert "accuracy before:" in out and "95% CI" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    old = [json.loads(line) for line in (tmp_path / "old_predictions.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (tmp_path / "new_predictions.jsonl").read_text().splitlines()]
    assert len(old) == len(new) == summary["settings"]["eval_problems"] == 8
    # chat prompts: the instruct model writes answers, it does not end its turn at once
    assert sum(bool(o["prediction"].strip()) for o in old) >= 6
    assert summary["accuracy"]["base"] == pytest.approx(sum(o["correct"] for o in old) / 8)
    negative = [o["id"] for o, n in zip(old, new) if o["correct"] and not n["correct"]]
    flips = json.loads((tmp_path / "flip_report" / "flips.json").read_text())
    assert flips["negative_flip_ids"] == negative
    rollouts = [json.loads(line) for line in
                (tmp_path / "onpolicy_dpo" / "round_0" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 8 and all(len(r["completions"]) == 2 for r in rollouts)
    assert all(c["token_ids"][-1] == 2 for r in rollouts for c in r["completions"] if c["finish_reason"] == "stop")
    assert (tmp_path / "onpolicy_dpo" / "round_0" / "model" / "adapter_model.safetensors").exists()
