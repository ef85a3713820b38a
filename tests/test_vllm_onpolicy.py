"""On-policy DPO rounds with ``rollout_backend: vllm`` end to end on SmolLM2 + LoRA (marker ``vllm``).

``alignkit train recipes/dpo_onpolicy_smollm2_vllm.yaml`` runs in a subprocess, as a user runs it, made
smaller (4 problems a round, 2 samples each, 40 tokens). Run 1 stops after round 0; run 2 asks for two
rounds with ``--resume_from_checkpoint true``: it must skip round 0 (its rollouts are not sampled again),
load round 0's adapter, and give it to vLLM as an adapter, so round 1's rollouts carry the log-probs of
the base model with that adapter, not of the base model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.vllm_support import LOGPROB_TOLERANCE, require_vllm, teacher_forced_logprobs

require_vllm()
pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "dpo_onpolicy_smollm2_vllm.yaml"
SMALL = ["--synthetic_train_size", "8", "--prompts_per_round", "4", "--rollout_n", "2",
         "--rollout_max_new_tokens", "40", "--per_device_train_batch_size", "2", "--save_steps", "1",
         "--logging_steps", "1", "--learning_rate", "1e-3", "--vllm_kv_cache_gb", "0.25", "--vllm_max_model_len", "512"]


def _train(output_dir: Path, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "alignkit", "train", str(RECIPE), "--output_dir", str(output_dir), *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"alignkit train failed ({proc.returncode}):\n{log[-8000:]}"
    return log


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _worst_logprob_error(model, tokenizer, rows) -> float:
    from alignkit.rollout.base import prompt_token_ids

    worst = 0.0
    for row in rows:
        pid = prompt_token_ids(tokenizer, row["prompt"])
        for c in row["completions"]:
            ref = teacher_forced_logprobs(model, pid, c["token_ids"])
            worst = max([worst] + [abs(a - b) for a, b in zip(c["logprobs"], ref)])
    return worst


def test_onpolicy_dpo_rounds_with_vllm_rollouts_resume(tmp_path):
    out = tmp_path / "run"
    _train(out, "--onpolicy_rounds", "1")
    state = json.loads((out / "onpolicy_state.json").read_text())
    assert state["rounds_completed"] == 1
    round0 = out / "round_0"
    rows0 = _rows(round0 / "rollouts.jsonl")
    assert len(rows0) == 4 and all(len(r["completions"]) == 2 for r in rows0)
    assert all(isinstance(r["prompt"], list) for r in rows0)  # chat prompts (the chat arithmetic task)
    assert _rows(round0 / "records.jsonl"), "round 0 produced no DPO pairs"
    assert (round0 / "model" / "adapter_model.safetensors").is_file()
    rollouts0 = (round0 / "rollouts.jsonl").read_bytes()

    log = _train(out, "--onpolicy_rounds", "2", "--resume_from_checkpoint", "true")
    assert "resuming after 1 finished round" in log
    assert (round0 / "rollouts.jsonl").read_bytes() == rollouts0  # round 0 was not sampled again
    state = json.loads((out / "onpolicy_state.json").read_text())
    assert state["rounds_completed"] == 2 and [h["round"] for h in state["history"]] == [0, 1]
    rows1 = _rows(out / "round_1" / "rollouts.jsonl")
    assert len(rows1) == 4 and (out / "round_1" / "model" / "adapter_model.safetensors").is_file()
    assert {json.dumps(r["prompt"]) for r in rows1}.isdisjoint({json.dumps(r["prompt"]) for r in rows0})

    # round 1 sampled from base + round 0's adapter (synced to vLLM as an adapter after the resume)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.modeling import resolve_model_path

    path = resolve_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base_err = _worst_logprob_error(base, tok, rows1)
    adapted = PeftModel.from_pretrained(base, str(round0 / "model")).eval()
    err = _worst_logprob_error(adapted, tok, rows1)
    assert err < LOGPROB_TOLERANCE, f"round 1 log-probs differ from base + round-0 adapter by {err:.2e}"
    assert base_err > 10 * LOGPROB_TOLERANCE, "round 0's adapter is indistinguishable from the base model"
