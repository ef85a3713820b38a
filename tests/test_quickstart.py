import json

import pytest

from alignkit.cli import main


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_fits_the_pairs(tmp_path, capsys):
    assert main(["quickstart", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    seen = summary["train_pairs_preference_accuracy"]
    assert seen["after"] > seen["before"] + 0.05, seen  # measured: 52.3% -> 61.7%
    assert (tmp_path / "dpo" / "model.safetensors").exists()
    assert "[5/5]" in capsys.readouterr().out
