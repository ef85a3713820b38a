"""On-policy rounds: rollout → verify → records → one trainer run → sync the engine, repeated.

Iterative ("online") DPO as in Xiong et al. 2024 and Pang et al. 2024: each round samples fresh
responses from the current policy, labels them with a verifier, pairs a correct response with an
incorrect one (the gold solution stands in when the policy got everything wrong), and runs one
ordinary DPO training run on those pairs. :func:`run_onpolicy_rounds` is the loop; the DPO trainer
switches it on with ``onpolicy_rounds > 0`` (``recipes/dpo_onpolicy_tiny.yaml``).

Everything a round produces lives in ``output_dir/round_<k>/``: ``rollouts.jsonl`` (verified),
``records.jsonl`` (what was trained on), ``rollout_stats.json``, checkpoints, and the round's model.
``output_dir/onpolicy_state.json`` records finished rounds, so a crashed run resumes where it
stopped: finished rounds are skipped (their model is loaded), a round's rollouts are never sampled
twice, and the interrupted round's trainer resumes from its last checkpoint.

Reference policy: ``onpolicy_reference="initial"`` keeps the starting model as the reference in every
round (with LoRA it is the base with the adapter off, so no copy is made); ``"round"`` uses the
policy at the start of each round (a frozen copy; full fine-tuning only).

With several processes, each samples its share of the prompts; the main process verifies and writes
the round's records, which every process then reads.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from alignkit.checkpoints import newest_complete_checkpoint
from alignkit.data.loading import read_json_lines
from alignkit.negatives import RolloutStats, sample_rollouts, verify_rollouts, write_jsonl

logger = logging.getLogger(__name__)

STATE_FILE = "onpolicy_state.json"
ROUND_STATS = ("accuracy", "pass_at_n", "all_wrong", "all_right", "records")


def round_problems(problems: Sequence[dict], round_index: int, per_round: int | None) -> list[dict]:
    """The problems of one round: all of them, or the next ``per_round`` in a rotation."""
    problems = list(problems)
    if not per_round or per_round >= len(problems):
        return problems
    start = (round_index * per_round) % len(problems)
    return [problems[(start + k) % len(problems)] for k in range(per_round)]


def load_saved_weights(model, directory: str | Path) -> None:
    """Load weights saved by ``save_model`` (a full model or a LoRA adapter) into ``model`` in place."""
    import safetensors.torch

    directory = Path(directory)
    adapter = directory / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, safetensors.torch.load_file(adapter))
        return
    single = directory / "model.safetensors"
    if single.exists():
        missing, unexpected = model.load_state_dict(safetensors.torch.load_file(single), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
            raise RuntimeError(f"{single}: weights do not match the model (missing {missing}, unexpected {unexpected})")
        return
    from transformers.modeling_utils import load_sharded_checkpoint

    load_sharded_checkpoint(model, str(directory), strict=False)


def _read_state(output_dir: Path) -> dict:
    path = output_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"rounds_completed": 0, "history": []}


def _write_state(output_dir: Path, state: dict) -> None:
    tmp = output_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(output_dir / STATE_FILE)


def _sample_sharded(engine, problems, n, sampling):
    """Each process samples its share; every process gets all rows back, in problem order."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return sample_rollouts(engine, problems, n, sampling)
    with state.split_between_processes(list(problems)) as mine:
        rows = sample_rollouts(engine, mine, n, sampling) if mine else []
    return gather_object(rows)


def run_onpolicy_rounds(
    *,
    trainer_cls,
    config,
    model,
    tokenizer,
    problems: Sequence[dict],
    rollout_args,
    build_records: Callable[[list[dict]], list[dict]],
    eval_dataset=None,
    resume: bool = False,
):
    """Run ``config.onpolicy_rounds`` rounds; returns the last round's trainer (or ``None``).

    ``build_records`` turns a round's verified rollout rows into the trainer's records (for DPO:
    :func:`alignkit.negatives.preference_pairs`).
    """
    from accelerate import PartialState

    from alignkit.trainers.base import _is_peft_model

    state_ = PartialState()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(output_dir) if resume else {"rounds_completed": 0, "history": []}
    is_peft = _is_peft_model(model)

    ref_model = None
    if config.onpolicy_reference == "round" and is_peft:
        raise ValueError("onpolicy_reference='round' needs full fine-tuning; with LoRA the reference is the base")
    if is_peft and config.reference in ("model", "precomputed"):
        raise ValueError(
            f"reference={config.reference!r} with LoRA in on-policy rounds would copy the trained adapter; "
            "use reference='adapter' (the base with the adapter off is the initial model)"
        )
    if config.onpolicy_reference == "initial" and not is_peft and config.reference not in ("none",):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    if getattr(config, "flip_guard_data", None):
        logger.warning("flip guard in on-policy rounds: each round is compared with the model it started from, "
                       "not with the initial model (run `alignkit flips` on the initial and final models for that)")
    done = state["rounds_completed"]
    saved = [output_dir / f"round_{k}" / "model" for k in range(done)]
    saved = [d for d in saved if d.is_dir()]
    if saved:  # rounds with no records saved no model: the last one that trained holds the weights
        load_saved_weights(model, saved[-1])
    if done:
        logger.info("on-policy: resuming after %d finished round(s)", done)
    engine = rollout_args.engine(model, tokenizer)
    if saved:  # vLLM engines load the checkpoint from disk: give them the resumed weights
        engine.sync_weights(model)
    verifier = rollout_args.make_verifier()
    base_seed = rollout_args.rollout_seed if rollout_args.rollout_seed is not None else config.seed

    trainer = None
    for r in range(done, config.onpolicy_rounds):
        round_dir = output_dir / f"round_{r}"
        records_path = round_dir / "records.jsonl"
        if not records_path.exists():
            start = time.perf_counter()
            subset = round_problems(problems, r, config.prompts_per_round)
            rows = _sample_sharded(engine, subset, rollout_args.rollout_n, rollout_args.sampling(seed=base_seed + r))
            if state_.is_main_process:
                rows = verify_rollouts(rows, verifier)
                stats = RolloutStats.of(rows, seconds=time.perf_counter() - start)
                records = build_records(rows)
                write_jsonl(rows, round_dir / "rollouts.jsonl")
                (round_dir / "rollout_stats.json").write_text(json.dumps({**stats.to_dict(), "records": len(records)}, indent=2))
                write_jsonl(records, records_path)  # last: its presence marks the round's data complete
                logger.info("round %d rollouts:\n%s\n%d training records", r, stats.format(), len(records))
            state_.wait_for_everyone()
        rollout_stats = json.loads((round_dir / "rollout_stats.json").read_text())
        records = [row for _, row in read_json_lines(records_path)]
        if not records:
            logger.warning("round %d: no training records (all prompts all-right or no fallback); skipping", r)
        else:
            round_config = copy.copy(config)
            round_config.output_dir = str(round_dir)
            trainer = trainer_cls(
                model=model,
                args=round_config,
                train_dataset=records,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                ref_model=ref_model,
            )
            checkpoint = newest_complete_checkpoint(round_dir)[0] if resume else None
            trainer.train(resume_from_checkpoint=checkpoint)
            # after train(): it starts a fresh log history, and these describe the data it trained on
            trainer.log({f"rollout/{k}": float(rollout_stats[k]) for k in ROUND_STATS} | {"round": float(r)})
            trainer.save_model(str(round_dir / "model"))
            model = trainer.model  # the unwrapped model (a peft model stays a peft model)
        engine.sync_weights(model)
        state["rounds_completed"] = r + 1
        state["history"].append({"round": r, **{k: rollout_stats[k] for k in ROUND_STATS}})
        if state_.is_main_process:
            _write_state(output_dir, state)
        state_.wait_for_everyone()
    return trainer, model
