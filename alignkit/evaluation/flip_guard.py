"""The flip guard: watch a training run for negative flips against the model it started from.

MUSCLE (Echterhoff et al. 2024, arXiv:2407.09435) calls an item a *negative flip* when the old model got
it right and the updated model gets it wrong. :class:`FlipGuardCallback` measures that during training:

* at train begin it evaluates the STARTING model on a held-out problem set (greedy decoding through a
  rollout engine, the ``hf`` engine on the training model by default, then a verifier, ``math`` by
  default) and caches the per-item results in ``OUTPUT_DIR/flip_guard_baseline.json``; a resumed run
  reads them back instead of evaluating its (already trained) weights;
* every ``eval_steps`` optimizer steps and at the last step it evaluates the current model on the same
  items and compares per item (:func:`alignkit.evaluation.flips.flip_metrics`), logging ``flips/nfr``,
  ``flips/pfr``, ``flips/nfr_mc``, ``flips/accuracy``, ``flips/accuracy_old`` (and ``flips/negative_flips``)
  through the trainer's log, so they reach ``report_to`` like any training metric. NFR_mc (new answer
  wrong and changed) compares the answers as the verifier reads them
  (:meth:`~alignkit.verifiers.base.Verifier.same_answer_batch`; the math verifier: the extracted
  answers), not the wording;
* ``action``: ``log`` (only measure), ``stop`` (end training at the first evaluation whose NFR exceeds
  ``max_nfr``), ``best`` (save the model of the most accurate evaluation whose NFR is within ``max_nfr``
  to ``OUTPUT_DIR/flip_guard_best``; with no budget every evaluation qualifies). The starting model is
  the baseline, not a candidate. Every action writes the history ``OUTPUT_DIR/flip_guard.json``: step,
  nfr, pfr, accuracy, flips and whether the budget held, per evaluation, plus the best step and where
  training stopped. On resume the history is cut back to the checkpoint's step (a best saved after the
  checkpoint is dropped: the resumed run re-evaluates those steps and reaches the same weights).

Logging: the alignkit trainers (``AlignTrainer.log``) merge the pending flip metrics into the log entry of
the step they were measured at (the callback asks for a log at that step). A plain ``transformers.Trainer``
gets them too if the callback is bound to it (``callback.bind(trainer)``); unbound, they go to the
history file and the Python logger only.

Several processes (DDP / DeepSpeed ZeRO-1/2, replicated weights): every process generates a contiguous
share of the items with its own full copy of the model, the shares are gathered, the main process
verifies and computes the metrics, and broadcasts them, so all processes take the same decision (``stop``
stops all of them; nothing hangs). Only the main process writes files. FSDP and ZeRO-3 shard the weights,
so per-process ``generate`` is not possible there: the callback refuses them with an error.

Cost: one greedy generation over at most ``max_items`` items (batched) per evaluation and once at start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from transformers import TrainerCallback

from alignkit.evaluation.flips import flip_metrics

logger = logging.getLogger(__name__)

FLIP_GUARD_ACTIONS = ("log", "stop", "best")
BASELINE_FILE = "flip_guard_baseline.json"
HISTORY_FILE = "flip_guard.json"
BEST_DIR = "flip_guard_best"
BASELINE_VERSION = 1


def check_action(action: str) -> str:
    if action not in FLIP_GUARD_ACTIONS:
        raise ValueError(f"flip guard action must be one of {FLIP_GUARD_ACTIONS}, got {action!r}")
    return action


def load_flip_problems(source, max_items: int | None = None) -> list[dict]:
    """Problems records (``prompt`` + ``answer`` / ``tests``) from a list, a ``datasets.Dataset``, a path,
    or a synthetic source (``synthetic:arithmetic_problems``: the held-out split, ``max_items`` of them);
    at most the first ``max_items``."""
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
        if source.startswith("synthetic:"):
            from alignkit.recipes import DataArguments, load_data

            data = load_data(source, DataArguments(synthetic_eval_size=max_items or 256), "problems", train=False)
        else:
            from alignkit.data.loading import load_records

            data = load_records(source, "problems")
    else:
        data = source
    problems = data.to_list() if hasattr(data, "to_list") else [dict(p) for p in data]
    if not problems:
        raise ValueError("the flip guard's problem set is empty")
    for i, p in enumerate(problems, start=1):
        if "prompt" not in p:
            raise ValueError(f"flip guard problem {i} has no 'prompt'")
    return problems[:max_items] if max_items else problems


def _problems_hash(problems: Sequence[dict]) -> str:
    text = json.dumps([[p.get("prompt"), p.get("answer"), p.get("tests")] for p in problems], sort_keys=True,
                      ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _check_replicated_weights() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.FSDP:
        raise NotImplementedError("the flip guard generates on each process's own copy of the model, which FSDP "
                                  "shards; run it after training with `alignkit flips` instead")
    if state.distributed_type == DistributedType.DEEPSPEED:
        plugin = AcceleratorState().deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            raise NotImplementedError("the flip guard cannot generate with DeepSpeed ZeRO-3 (sharded weights); "
                                      "use ZeRO-2 or evaluate after training with `alignkit flips`")


class FlipGuardCallback(TrainerCallback):
    """Negative flips of the model being trained against its starting point; see the module docstring.

    Args:
        problems: problems records, or a source for :func:`load_flip_problems`.
        eval_steps: evaluate every this many optimizer steps (and at the last step).
        max_nfr: NFR budget (share of all items), ``None`` for none.
        action: ``log``, ``stop`` or ``best``.
        max_items: evaluate at most this many items (the first ones).
        verifier: a verifier name (``math``) or a :class:`~alignkit.verifiers.base.Verifier`.
        max_new_tokens: greedy decoding length.
        batch_size: sequences generated together by the default ``hf`` engine.
        engine: a rollout engine (synced to the model before each evaluation) or a factory
            ``engine(model, tokenizer)``; default: the ``hf`` engine on the unwrapped training model.
        tokenizer: default: the trainer's ``processing_class``.
        output_dir: where the baseline cache, history and best model go; default the run's ``output_dir``.
        verifier_num_workers: processes for verification (default: the verifier's own).
    """

    def __init__(self, problems, *, eval_steps: int = 100, max_nfr: float | None = None, action: str = "log",
                 max_items: int | None = 256, verifier="math", max_new_tokens: int = 256, batch_size: int = 64,
                 engine=None, tokenizer=None, output_dir: str | None = None, verifier_num_workers: int | None = None):
        check_action(action)
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        if max_nfr is not None and not 0.0 <= max_nfr <= 1.0:
            raise ValueError(f"max_nfr is a share of items in [0, 1], got {max_nfr}")
        if action == "stop" and max_nfr is None:
            raise ValueError("action='stop' needs an NFR budget (max_nfr)")
        self.problems = load_flip_problems(problems, max_items)
        self.eval_steps = int(eval_steps)
        self.max_nfr = max_nfr
        self.action = action
        self.verifier = verifier
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.engine = engine
        self.tokenizer = tokenizer
        self.output_dir = output_dir
        self.verifier_num_workers = verifier_num_workers
        self.trainer = None
        self.baseline: list[bool] | None = None
        self.history: list[dict] = []
        self.best: dict | None = None
        self.stopped_at: int | None = None
        self._pending: dict[str, float] = {}
        self._last_step: int | None = None
        self.baseline_computed = False  # True when this run evaluated the starting model (not read from cache)

    # ------------------------------------------------------------------------------------- plumbing

    def bind(self, trainer) -> "FlipGuardCallback":
        """Log through ``trainer.log`` where the trainer does not merge pending logs itself."""
        self.trainer = trainer
        return self

    def pop_logs(self) -> dict[str, float]:
        """The metrics of the last evaluation not yet logged (the alignkit trainers call this in ``log``)."""
        out, self._pending = self._pending, {}
        return out

    def _dir(self, args) -> Path:
        return Path(self.output_dir or args.output_dir)

    def _verifier(self):
        if isinstance(self.verifier, str):
            from alignkit.verifiers import get_verifier

            self.verifier = get_verifier(self.verifier)
        return self.verifier

    def _engine(self, model, tokenizer):
        from accelerate.utils import extract_model_from_parallel

        inner = extract_model_from_parallel(model)
        if self.engine is None:
            from alignkit.rollout.hf import HFEngine

            if tokenizer is None:
                raise ValueError("the flip guard needs a tokenizer (pass tokenizer= or train with processing_class)")
            self.engine = HFEngine(inner, tokenizer, batch_size=self.batch_size, progress=False)
        elif not hasattr(self.engine, "generate"):  # a factory
            self.engine = self.engine(inner, tokenizer)
        else:
            self.engine.sync_weights(inner)
        return self.engine

    def _key(self) -> dict:
        verifier = self.verifier if isinstance(self.verifier, str) else getattr(self.verifier, "name", type(self.verifier).__name__)
        return {"version": BASELINE_VERSION, "problems": _problems_hash(self.problems), "items": len(self.problems),
                "max_new_tokens": self.max_new_tokens, "verifier": verifier}

    # ----------------------------------------------------------------------------------- evaluation

    def evaluate(self, model, tokenizer=None) -> list[bool]:
        """Per-item correctness of ``model``'s greedy answers (every process gets the same list)."""
        from alignkit.reference_samples import on_main_process, sample_texts
        from alignkit.rollout.base import SamplingConfig

        engine = self._engine(model, tokenizer if tokenizer is not None else self.tokenizer)
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=0, logprobs=False)
        texts = [group[0] for group in sample_texts(engine, [p["prompt"] for p in self.problems], 1, sampling)]
        self._texts = texts
        return on_main_process(lambda: [
            bool(v.correct) for v in self._verifier().verify_batch(self.problems, texts, num_workers=self.verifier_num_workers)
        ])

    def _answers_changed(self, texts) -> list[bool] | None:
        """Per item, whether the answer in ``texts`` differs from the starting model's, as the verifier
        reads answers; ``None`` when the starting model's texts are unknown (a cache from before they were kept)."""
        from alignkit.reference_samples import on_main_process

        baseline = getattr(self, "baseline_texts", None)
        if not baseline or texts is None or len(baseline) != len(texts):
            return None
        return on_main_process(lambda: [
            not same for same in self._verifier().same_answer_batch(
                self.problems, baseline, texts, num_workers=self.verifier_num_workers)
        ])

    # ----------------------------------------------------------------------------------- callbacks

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        from accelerate import PartialState

        from alignkit.reference_samples import on_main_process, weights_digest

        _check_replicated_weights()
        if self.tokenizer is None:
            self.tokenizer = processing_class
        out = self._dir(args)
        key = self._key()
        resumed = state.global_step > 0
        digest = weights_digest(model)

        def read_cache():
            path = out / BASELINE_FILE
            if not path.exists():
                return None
            cached = json.loads(path.read_text())
            if cached.get("key") != key:
                logger.warning("flip guard: %s was made for other problems or settings; evaluating again", path)
                return None
            if not resumed and cached.get("weights") != digest:
                logger.warning("flip guard: %s was made for another starting model; evaluating again", path)
                return None
            return cached["correct"], cached.get("texts")

        cached = on_main_process(read_cache)
        if cached is not None:
            self.baseline = [bool(c) for c in cached[0]]
            self.baseline_texts = cached[1]
            self.baseline_computed = False
        else:
            if resumed:
                logger.warning("flip guard: resuming at step %d without a cached baseline; the resumed weights "
                               "stand in for the starting model", state.global_step)
            self.baseline = self.evaluate(model)
            self.baseline_texts = getattr(self, "_texts", None)
            self.baseline_computed = True
            if PartialState().is_main_process:
                out.mkdir(parents=True, exist_ok=True)
                payload = {"key": key, "weights": digest, "step": state.global_step, "correct": self.baseline,
                           "texts": getattr(self, "_texts", None)}
                _write_json(out / BASELINE_FILE, payload)
        self.history, self.best, self.stopped_at = [], None, None
        if resumed:
            self._restore_history(out, state.global_step)
        self._last_step = state.global_step if resumed else None
        self._write_history(args)
        return control

    def _restore_history(self, out: Path, step: int) -> None:
        from accelerate import PartialState

        path = out / HISTORY_FILE
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        self.history = [h for h in saved.get("history", []) if h["step"] <= step]
        best = saved.get("best")
        if best is not None and best["step"] <= step:
            self.best = best
        elif best is not None and PartialState().is_main_process:
            shutil.rmtree(out / BEST_DIR, ignore_errors=True)  # saved after the checkpoint: redone by the resumed run

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if step % self.eval_steps == 0 or (state.max_steps and step >= state.max_steps):
            self._evaluate_now(args, state, control, model, processing_class)
            if self.trainer is not None and not getattr(self.trainer, "merges_callback_logs", False):
                self.trainer.log(self.pop_logs())  # a plain Trainer: log now
            else:
                control.should_log = True  # an alignkit trainer merges them into this step's log
        return control

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.baseline is None or self._last_step == state.global_step or self.stopped_at is not None:
            return control
        self._evaluate_now(args, state, control, model, processing_class)
        if self.trainer is not None:
            merges = getattr(self.trainer, "merges_callback_logs", False)
            self.trainer.log({} if merges else self.pop_logs())
        else:
            state.log_history.append({**self.pop_logs(), "step": state.global_step})
        return control

    def _evaluate_now(self, args, state, control, model, processing_class) -> None:
        from accelerate import PartialState

        new = self.evaluate(model, processing_class)
        m = flip_metrics(self.baseline, new, changed=self._answers_changed(getattr(self, "_texts", None)))
        within = self.max_nfr is None or m.nfr <= self.max_nfr
        entry = {"step": state.global_step, "nfr": m.nfr, "pfr": m.pfr, "nfr_mc": m.nfr_mc,
                 "accuracy": m.accuracy_new, "accuracy_old": m.accuracy_old, "negative_flips": m.negative_flips,
                 "positive_flips": m.positive_flips, "within_budget": within}
        self.history.append(entry)
        self._last_step = state.global_step
        self._pending = {"flips/nfr": m.nfr, "flips/pfr": m.pfr, "flips/accuracy": m.accuracy_new,
                         "flips/accuracy_old": m.accuracy_old, "flips/negative_flips": float(m.negative_flips)}
        if m.nfr_mc is not None:
            self._pending["flips/nfr_mc"] = m.nfr_mc
        if PartialState().is_main_process:
            logger.info("flip guard step %d: accuracy %.3f (old %.3f), NFR %.3f, PFR %.3f", state.global_step,
                        m.accuracy_new, m.accuracy_old, m.nfr, m.pfr)
        if self.action == "stop" and not within:
            if PartialState().is_main_process:
                logger.warning("flip guard: NFR %.4f exceeds the budget %.4f at step %d; stopping training",
                               m.nfr, self.max_nfr, state.global_step)
            self.stopped_at = state.global_step
            control.should_training_stop = True
        if self.action == "best" and within:
            better = self.best is None or (m.accuracy_new, -m.nfr) > (self.best["accuracy"], -self.best["nfr"])
            if better:
                self.best = {"step": state.global_step, "accuracy": m.accuracy_new, "nfr": m.nfr, "pfr": m.pfr,
                             "path": str(self._dir(args) / BEST_DIR)}
                if PartialState().is_main_process:
                    self._save_best(model, self._dir(args) / BEST_DIR, processing_class)
        self._write_history(args)

    def _save_best(self, model, path: Path, processing_class) -> None:
        from accelerate.utils import extract_model_from_parallel

        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extract_model_from_parallel(model).save_pretrained(tmp)
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        _write_json(tmp / "flip_guard_best.json", self.best)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def _write_history(self, args) -> None:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return
        out = self._dir(args)
        out.mkdir(parents=True, exist_ok=True)
        accuracy_old = sum(self.baseline) / len(self.baseline) if self.baseline else 0.0
        _write_json(out / HISTORY_FILE, {
            "action": self.action, "max_nfr": self.max_nfr, "items": len(self.problems),
            "accuracy_old": accuracy_old, "eval_steps": self.eval_steps, "history": self.history,
            "best": self.best, "stopped_at": self.stopped_at,
        })


def _write_json(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
