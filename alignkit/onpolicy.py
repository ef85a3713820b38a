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
twice, and the interrupted round's trainer resumes from its last checkpoint. The state is an
:mod:`alignkit.cache` entry keyed by everything the rounds depend on (the starting model's full weights
digest, the problems, the sampling and verification settings, the method and its training settings): a
run with other inputs in the same output directory starts over instead of reusing rounds that are not
its own, and a run that does not resume samples every round afresh.

Sampling goes through the one rollout setup (:class:`alignkit.rollout.setup.RolloutSetup`): the engine
is built on the policy, synced after each round, and round ``r`` samples with seed ``base + r``. The
recipe layer passes the plug-ins (compatibility term, flip guard) of each round's trainer through
``round_plugins``.

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

from accelerate import PartialState

from alignkit.checkpoints import newest_complete_checkpoint
from alignkit.cache import (
    CacheEntry,
    json_digest,
    model_key,
    on_main_process,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from alignkit.negatives import RolloutStats, sample_rollouts, verify_rollouts
from alignkit.rollout.setup import RolloutSetup, map_sharded
from alignkit.trainers.base import is_peft_model

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


TRAINING_KEYS = ("learning_rate", "beta", "loss_type", "label_smoothing", "sft_weight", "num_train_epochs", "max_steps",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "reference", "max_length",
                 "max_prompt_length", "seed", "pairs_per_prompt", "chosen_fallback", "onpolicy_reference",
                 "prompts_per_round")


def state_key(*, trainer_cls, config, model, problems: Sequence[dict], setup: RolloutSetup) -> dict:
    """What the finished rounds of a run depend on (the starting ``model``, before any round's weights)."""
    return {
        "kind": "onpolicy_state",
        "version": 1,
        "method": trainer_cls.__name__,
        **model_key(model, exclude=()),
        "problems": {"count": len(problems), "sha256": json_digest([[p["prompt"], p.get("answer"), p.get("tests")]
                                                                   for p in problems])},
        "sampling": setup.sampling(0).to_dict(),
        "rollout_n": setup.args.rollout_n,
        "backend": setup.backend,
        "verifier": setup.verifier_name,
        "training": {k: getattr(config, k, None) for k in TRAINING_KEYS},
    }


def _read_state(entry: CacheEntry, resume: bool) -> dict | None:
    """The finished rounds to resume from, or ``None`` to start over (main process decides)."""
    if not resume or not entry.path.exists():
        return None
    if not entry.matches():
        logger.warning("on-policy: %s holds the rounds of other inputs (starting weights, problems, sampling or "
                       "training settings differ); starting over", entry.path)
        return None
    return read_json(entry.path)


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
    round_plugins: Callable[[], dict] | None = None,
    rollout_engine=None,
    verifier=None,
):
    """Run ``config.onpolicy_rounds`` rounds; returns the last round's trainer (or ``None``).

    ``build_records`` turns a round's verified rollout rows into the trainer's records (for DPO:
    :func:`alignkit.negatives.preference_pairs`). ``round_plugins()`` gives each round's trainer its
    plug-ins (``aux_losses``, ``callbacks``: fresh ones per round); ``rollout_engine`` and ``verifier`` are
    objects to use instead of building them from ``rollout_args``.
    """
    state_ = PartialState()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup = RolloutSetup(rollout_args, tokenizer, engine=rollout_engine, seed=config.seed, verifier=verifier)
    entry = CacheEntry(output_dir / STATE_FILE, state_key(trainer_cls=trainer_cls, config=config, model=model,
                                                           problems=problems, setup=setup))
    state = on_main_process(lambda: _read_state(entry, resume))
    resume = state is not None  # the round files and checkpoints in output_dir are this run's
    state = state or {"rounds_completed": 0, "history": []}
    is_peft = is_peft_model(model)

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

    plugins = round_plugins() if round_plugins is not None else {}
    if any(hasattr(cb, "pop_logs") for cb in plugins.get("callbacks", [])):
        logger.warning("flip guard in on-policy rounds: each round is compared with the model it started from, "
                       "not with the initial model (run `alignkit flips` on the initial and final models for that)")
    done = state["rounds_completed"]
    saved = [output_dir / f"round_{k}" / "model" for k in range(done)]
    saved = [d for d in saved if d.is_dir()]
    if saved:  # rounds with no records saved no model: the last one that trained holds the weights
        load_saved_weights(model, saved[-1])
    if done:
        logger.info("on-policy: resuming after %d finished round(s)", done)
    try:
        # a vLLM engine loads the checkpoint from disk: a resumed run gives it the resumed weights
        engine = setup.engine(model, sync=bool(saved))
        verifier = setup.verifier()

        trainer = None
        for r in range(done, config.onpolicy_rounds):
            round_dir = output_dir / f"round_{r}"
            records_path = round_dir / "records.jsonl"
            if not (resume and r == done and records_path.exists()):  # only the interrupted round's data is reused
                start = time.perf_counter()
                subset = round_problems(problems, r, config.prompts_per_round)
                rows = map_sharded(subset, lambda share: sample_rollouts(engine, share, setup.args.rollout_n,
                                                                         setup.sampling(r)))
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
            records = read_jsonl(records_path)
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
                    **(plugins if r == done else round_plugins() if round_plugins is not None else {}),
                )
                checkpoint = newest_complete_checkpoint(round_dir)[0] if resume else None
                trainer.train(resume_from_checkpoint=checkpoint)
                # after train(): it starts a fresh log history, and these describe the data it trained on
                trainer.log({f"rollout/{k}": float(rollout_stats[k]) for k in ROUND_STATS} | {"round": float(r)})
                trainer.save_model(str(round_dir / "model"))
                model = trainer.model  # the unwrapped model (a peft model stays a peft model)
            if r + 1 < config.onpolicy_rounds:
                engine = setup.engine(model)  # sync the trained weights for the next round's sampling
            state["rounds_completed"] = r + 1
            state["history"].append({"round": r, **{k: rollout_stats[k] for k in ROUND_STATS}})
            if state_.is_main_process:
                entry.store(state, write_json)
            state_.wait_for_everyone()
    finally:  # the engine's memory and process groups, freed before the caller goes on or exits
        setup.close()
    return trainer, model
