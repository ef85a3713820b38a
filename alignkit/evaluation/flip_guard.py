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
  training stopped, and draws it over the steps in ``OUTPUT_DIR/flip_guard.png`` (``alignkit flips
  --flip_guard`` adds both to a flip report). On resume the history is cut back to the checkpoint's step (a best saved after the
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

It is a plug-in: the recipe layer builds it from the recipe keys ``flip_guard_*``
(:class:`FlipGuardArguments`), with the problems loaded and chat-formatted by the recipe's data settings;
the Python API passes it to any trainer as ``callbacks=[FlipGuardCallback(...)]``. Generation goes through
the one rollout setup (:class:`alignkit.rollout.setup.RolloutSetup`: the ``hf`` engine on the training model
unless an engine or rollout arguments are given); the baseline is cached through :mod:`alignkit.cache`.

Cost: one greedy generation over at most ``max_items`` items (batched) per evaluation and once at start.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

from alignkit.cache import CacheEntry, cached, is_main_process, json_digest, model_key, on_main_process, read_json, write_json
from alignkit.data.loading import load_records
from alignkit.evaluation.flips import flip_metrics
from alignkit.rollout.arguments import RolloutArguments
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.setup import RolloutSetup
from alignkit.verifiers import get_verifier

logger = logging.getLogger(__name__)

FLIP_GUARD_ACTIONS = ("log", "stop", "best")
BASELINE_FILE = "flip_guard_baseline.json"
HISTORY_FILE = "flip_guard.json"
PLOT_FILE = "flip_guard.png"
BEST_DIR = "flip_guard_best"
BASELINE_VERSION = 2


def check_action(action: str) -> str:
    if action not in FLIP_GUARD_ACTIONS:
        raise ValueError(f"flip guard action must be one of {FLIP_GUARD_ACTIONS}, got {action!r}")
    return action


@dataclass
class FlipGuardArguments:
    """The recipe keys of the flip guard (parsed next to the method's config; no ``flip_guard_data`` = off)."""

    flip_guard_data: str | None = field(
        default=None,
        metadata={"help": "Held-out problems (path or a recipe source such as synthetic:arithmetic_problems, read with "
                          "the recipe's data and chat settings) for negative-flip checks; None = off."},
    )
    flip_guard_steps: int = field(default=100, metadata={"help": "Flip guard: evaluate every N optimizer steps."})
    flip_guard_max_nfr: float | None = field(default=None, metadata={"help": "Flip guard: NFR budget (share of items)."})
    flip_guard_action: str = field(default="log", metadata={"help": "Flip guard: log, stop or best."})
    flip_guard_max_items: int = field(default=256, metadata={"help": "Flip guard: evaluate at most N items."})
    flip_guard_verifier: str = field(default="math", metadata={"help": "Flip guard: verifier name."})
    flip_guard_max_new_tokens: int = field(default=256, metadata={"help": "Flip guard: greedy decoding length."})
    flip_guard_batch_size: int | None = field(
        default=None, metadata={"help": "Flip guard: sequences generated together; default: chosen from memory (hf backend)."}
    )

    def __post_init__(self):
        check_action(self.flip_guard_action)
        if self.flip_guard_steps < 1:
            raise ValueError(f"flip_guard_steps must be >= 1, got {self.flip_guard_steps}")
        if self.flip_guard_max_nfr is not None and not 0.0 <= self.flip_guard_max_nfr <= 1.0:
            raise ValueError(f"flip_guard_max_nfr is a share of items in [0, 1], got {self.flip_guard_max_nfr}")
        if self.flip_guard_data and self.flip_guard_action == "stop" and self.flip_guard_max_nfr is None:
            raise ValueError("flip_guard_action='stop' needs an NFR budget: set flip_guard_max_nfr")

    def callback(self, problems, **kwargs) -> FlipGuardCallback:
        """The callback for ``problems`` (loaded from ``flip_guard_data``); ``kwargs`` go to the callback."""
        return FlipGuardCallback(
            problems, eval_steps=self.flip_guard_steps, max_nfr=self.flip_guard_max_nfr, action=self.flip_guard_action,
            max_items=self.flip_guard_max_items, verifier=self.flip_guard_verifier,
            max_new_tokens=self.flip_guard_max_new_tokens, batch_size=self.flip_guard_batch_size, **kwargs,
        )


def load_flip_problems(source, max_items: int | None = None) -> list[dict]:
    """Problems records (``prompt`` + ``answer`` / ``tests``) from a list, a ``datasets.Dataset`` or a
    JSONL / Parquet path (validated); at most the first ``max_items``. Recipe sources (``synthetic:...``,
    ``gsm8k:...``) are read by the recipe layer (:func:`alignkit.recipes.load_data`)."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
        raise ValueError(f"flip guard problems {str(source)!r}: no such file (a recipe source such as "
                         "synthetic:arithmetic_problems is read by the recipe layer: alignkit.recipes.load_data)")
    data = load_records(source, "problems") if isinstance(source, (str, os.PathLike)) else source
    problems = data.to_list() if hasattr(data, "to_list") else [dict(p) for p in data]
    if not problems:
        raise ValueError("the flip guard's problem set is empty")
    for i, p in enumerate(problems, start=1):
        if "prompt" not in p:
            raise ValueError(f"flip guard problem {i} has no 'prompt'")
    return problems[:max_items] if max_items else problems


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
        batch_size: sequences generated together by the default ``hf`` engine; ``None``: chosen from memory
            (:func:`alignkit.rollout.hf.default_batch_size`).
        engine: a rollout engine (synced to the model before each evaluation) or a factory
            ``engine(model, tokenizer)``; default: the engine ``rollout_args`` describe, the ``hf`` engine on
            the unwrapped training model unless given.
        rollout_args: :class:`~alignkit.rollout.arguments.RolloutArguments` of the engine to build (only the
            backend and engine options are used: decoding is greedy, ``max_new_tokens`` long).
        tokenizer: default: the trainer's ``processing_class``.
        output_dir: where the baseline cache, history and best model go; default the run's ``output_dir``.
        verifier_num_workers: processes for verification (default: the verifier's own).
        plot: after each evaluation, draw the history (NFR, PFR, accuracy over the steps) into
            ``OUTPUT_DIR/flip_guard.png`` (:func:`alignkit.evaluation.flip_render.plot_flip_guard`).
    """

    def __init__(self, problems, *, eval_steps: int = 100, max_nfr: float | None = None, action: str = "log",
                 max_items: int | None = 256, verifier="math", max_new_tokens: int = 256, batch_size: int | None = None,
                 engine=None, rollout_args: RolloutArguments | None = None, tokenizer=None, output_dir: str | None = None,
                 verifier_num_workers: int | None = None, plot: bool = True):
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
        self.batch_size = None if batch_size is None else int(batch_size)
        self.engine = engine
        self.rollout_args = rollout_args
        self._rollout: RolloutSetup | None = None
        self.tokenizer = tokenizer
        self.output_dir = output_dir
        self.verifier_num_workers = verifier_num_workers
        self.plot = plot
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
            self.verifier = get_verifier(self.verifier)
        return self.verifier

    def _setup(self, tokenizer) -> RolloutSetup:
        if self._rollout is None:
            if tokenizer is None:
                raise ValueError("the flip guard needs a tokenizer (pass tokenizer= or train with processing_class)")
            args = self.rollout_args or RolloutArguments(rollout_backend="hf", rollout_batch_size=self.batch_size)
            options = {"progress": False} if args.rollout_backend == "hf" else {}
            self._rollout = RolloutSetup(args, tokenizer, engine=self.engine, engine_options=options)
        return self._rollout

    def _sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=0, logprobs=False)

    def _key(self, model) -> dict:
        verifier = self.verifier if isinstance(self.verifier, str) else getattr(self.verifier, "name", type(self.verifier).__name__)
        problems = json_digest([[p.get("prompt"), p.get("answer"), p.get("tests")] for p in self.problems])
        return {"kind": "flip_guard_baseline", "version": BASELINE_VERSION, "problems": problems,
                "items": len(self.problems), "max_new_tokens": self.max_new_tokens, "verifier": verifier,
                "starting_model": model_key(model, exclude=())}

    # ----------------------------------------------------------------------------------- evaluation

    def evaluate(self, model, tokenizer=None) -> list[bool]:
        """Per-item correctness of ``model``'s greedy answers (every process gets the same list)."""
        setup = self._setup(tokenizer if tokenizer is not None else self.tokenizer)
        inner = extract_model_from_parallel(model)
        groups = setup.sample_texts(inner, [p["prompt"] for p in self.problems], 1, self._sampling())
        texts = [group[0] for group in groups]
        self._texts = texts
        return on_main_process(lambda: [
            bool(v.correct) for v in self._verifier().verify_batch(self.problems, texts, num_workers=self.verifier_num_workers)
        ])

    def _answers_changed(self, texts) -> list[bool] | None:
        """Per item, whether the answer in ``texts`` differs from the starting model's, as the verifier
        reads answers; ``None`` when the starting model's texts are unknown."""
        baseline = getattr(self, "baseline_texts", None)
        if not baseline or texts is None or len(baseline) != len(texts):
            return None
        return on_main_process(lambda: [
            not same for same in self._verifier().same_answer_batch(
                self.problems, baseline, texts, num_workers=self.verifier_num_workers)
        ])

    # ----------------------------------------------------------------------------------- callbacks

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        _check_replicated_weights()
        if self.tokenizer is None:
            self.tokenizer = processing_class
        out = self._dir(args)
        resumed = state.global_step > 0
        entry = CacheEntry(out / BASELINE_FILE, self._key(extract_model_from_parallel(model)))

        def same(stored: dict, key: dict) -> bool:
            """A resumed run's weights are not the starting model's: everything but the weights must match."""
            if resumed:
                return {k: v for k, v in stored.items() if k != "starting_model"} == \
                    {k: v for k, v in key.items() if k != "starting_model"}
            return stored == key

        if resumed and not on_main_process(lambda: entry.matches(same)):
            logger.warning("flip guard: resuming at step %d without a cached baseline; the resumed weights "
                           "stand in for the starting model", state.global_step)
        computed = []

        def compute():
            computed.append(True)
            correct = self.evaluate(model)
            return {"step": state.global_step, "correct": correct, "texts": getattr(self, "_texts", None)}

        baseline = cached(entry, compute, read=read_json, write=write_json, collective=True, same=same,
                          what="flip guard baseline")
        self.baseline = [bool(c) for c in baseline["correct"]]
        self.baseline_texts = baseline.get("texts")
        self.baseline_computed = bool(computed)
        self.history, self.best, self.stopped_at = [], None, None
        if resumed:
            self._restore_history(out, state.global_step)
        self._last_step = state.global_step if resumed else None
        self._write_history(args)
        return control

    def _restore_history(self, out: Path, step: int) -> None:
        path = out / HISTORY_FILE
        if not path.exists():
            return
        saved = read_json(path)
        self.history = [h for h in saved.get("history", []) if h["step"] <= step]
        best = saved.get("best")
        if best is not None and best["step"] <= step:
            self.best = best
        elif best is not None and is_main_process():
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
        if is_main_process():
            logger.info("flip guard step %d: accuracy %.3f (old %.3f), NFR %.3f, PFR %.3f", state.global_step,
                        m.accuracy_new, m.accuracy_old, m.nfr, m.pfr)
        if self.action == "stop" and not within:
            if is_main_process():
                logger.warning("flip guard: NFR %.4f exceeds the budget %.4f at step %d; stopping training",
                               m.nfr, self.max_nfr, state.global_step)
            self.stopped_at = state.global_step
            control.should_training_stop = True
        if self.action == "best" and within:
            better = self.best is None or (m.accuracy_new, -m.nfr) > (self.best["accuracy"], -self.best["nfr"])
            if better:
                self.best = {"step": state.global_step, "accuracy": m.accuracy_new, "nfr": m.nfr, "pfr": m.pfr,
                             "path": str(self._dir(args) / BEST_DIR)}
                if is_main_process():
                    self._save_best(model, self._dir(args) / BEST_DIR, processing_class)
        self._write_history(args)

    def _save_best(self, model, path: Path, processing_class) -> None:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extract_model_from_parallel(model).save_pretrained(tmp)
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        write_json(self.best, tmp / "flip_guard_best.json")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def _write_history(self, args) -> None:
        if not is_main_process():
            return
        out = self._dir(args)
        out.mkdir(parents=True, exist_ok=True)
        accuracy_old = sum(self.baseline) / len(self.baseline) if self.baseline else 0.0
        write_json({
            "action": self.action, "max_nfr": self.max_nfr, "items": len(self.problems),
            "accuracy_old": accuracy_old, "eval_steps": self.eval_steps, "history": self.history,
            "best": self.best, "stopped_at": self.stopped_at,
        }, out / HISTORY_FILE)
        if self.history and self.plot:  # NFR and accuracy over the steps so far, next to the history
            from alignkit.evaluation.flip_render import plot_flip_guard

            try:
                plot_flip_guard(out / HISTORY_FILE, out / PLOT_FILE)
            except Exception as e:  # noqa: BLE001 - a picture never stops training
                logger.warning("flip guard: %s not written: %s: %s", out / PLOT_FILE, type(e).__name__, e)
