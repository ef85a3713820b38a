"""The one rollout setup every sampling caller uses: engine, weight sync, seed and sampling settings.

D²O reference samples and refreshes (:mod:`alignkit.trainers.d2o`), per-step records
(:mod:`alignkit.trainers.perstep`), on-policy rounds (:mod:`alignkit.onpolicy`), the flip guard
(:mod:`alignkit.evaluation.flip_guard`) and the sample cache (:mod:`alignkit.reference_samples`) all
sample through a :class:`RolloutSetup`:

* **engine**: built on first use from :class:`~alignkit.rollout.arguments.RolloutArguments` through the one
  backend dispatch, :func:`alignkit.rollout.make_engine`; or given (an engine object, or a factory
  ``engine(model, tokenizer)``, e.g. a test double);
* **weight sync**: :meth:`RolloutSetup.engine` points the engine at the model to sample from: a new engine
  is built on it, an existing one gets ``sync_weights(model)`` (``sync=True`` syncs a new one too, for a
  vLLM engine built from a checkpoint path whose weights the model no longer has);
* **seed**: ``rollout_seed``, else the training seed; :meth:`RolloutSetup.sampling` offsets it per use
  (the training step of a D²O refresh, the round of an on-policy run, 1 for per-step values), so every
  sampling call of a run is reproducible and no two share a seed by accident;
* **sampling settings**: always a :class:`~alignkit.rollout.base.SamplingConfig`;
* **processes**: :func:`map_sharded` runs a sampling function on each process's contiguous share of the
  items and gives every process all results in order (``accelerate``'s ``split_between_processes`` and
  ``gather_object``; every process must call it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TypeVar

from alignkit.rollout.arguments import RolloutArguments
from alignkit.rollout.base import Prompt, RolloutEngine, SamplingConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")


def map_sharded(items: Sequence, fn: Callable[[list], list[T]]) -> list[T]:
    """``fn`` on each process's contiguous share of ``items`` (one result per item); every process gets the
    results of all items back, in item order. One process: ``fn(items)``."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return fn(list(items))
    with state.split_between_processes(list(items)) as share:
        results = fn(list(share)) if share else []
    return gather_object(results)


def sample_texts(engine: RolloutEngine, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig, *,
                 context=None, transform: Callable[[Prompt], Prompt] | None = None) -> list[list[str]]:
    """``n`` completion texts per prompt, in prompt order, each process sampling its share (every process
    must call this). ``context`` (e.g. a peft model's ``disable_adapter()``) is entered around the engine
    call; ``transform`` rewrites each prompt before sampling (an instruction prefix)."""

    def generate(share: list) -> list[list[str]]:
        if not share:
            return []
        sent = [transform(p) for p in share] if transform is not None else share
        with context if context is not None else nullcontext():
            groups = engine.generate(sent, n=n, sampling=sampling)
        return [[c.text for c in group] for group in groups]

    return map_sharded(prompts, generate)


class RolloutSetup:
    """Engine, weight sync, seed and sampling settings of one run's sampling (see the module docstring).

    Args:
        args: the recipe's ``rollout_*`` / ``verifier`` keys (defaults when ``None``).
        tokenizer: the model's tokenizer (prompts are rendered with its chat template).
        engine: an engine to use instead of building one, or a factory ``engine(model, tokenizer)``.
        seed: the training seed, used when ``args.rollout_seed`` is not set.
        engine_options: extra :func:`~alignkit.rollout.make_engine` options (e.g. ``progress=False``).
        verifier: a verifier object to use instead of ``args.verifier``.
    """

    def __init__(self, args: RolloutArguments | None = None, tokenizer=None, *, engine=None, seed: int = 0,
                 engine_options: dict | None = None, verifier=None):
        self.args = args if args is not None else RolloutArguments()
        self.tokenizer = tokenizer
        self.engine_options = dict(engine_options or {})
        self._verifier = verifier
        self._engine: RolloutEngine | None = None
        self._factory = None
        if engine is not None and not hasattr(engine, "generate"):
            self._factory = engine
        else:
            self._engine = engine
        self.injected = engine is not None
        self.base_seed = self.args.rollout_seed if self.args.rollout_seed is not None else seed

    @property
    def backend(self) -> str:
        """The backend name, as a cache key sees it (``injected`` for an engine passed in)."""
        return "injected" if self.injected else self.args.rollout_backend

    @property
    def verifier_name(self) -> str:
        """The verifier's name, as a cache key sees it (a verifier passed in: its ``name``)."""
        if self._verifier is not None:
            return str(getattr(self._verifier, "name", type(self._verifier).__name__))
        return self.args.verifier

    @property
    def built(self) -> bool:
        return self._engine is not None

    def seed(self, offset: int = 0) -> int:
        return self.base_seed + offset

    def sampling(self, offset: int = 0, **overrides) -> SamplingConfig:
        """The run's sampling settings with seed ``base seed + offset`` (``overrides``: any other setting)."""
        return self.args.sampling(seed=self.seed(offset), **overrides)

    def engine(self, model, *, sync: bool = False) -> RolloutEngine:
        """The engine, pointed at ``model``: built on first use (and synced too when ``sync``), synced after."""
        if self._engine is None:
            if self._factory is not None:
                self._engine = self._factory(model, self.tokenizer)
            else:
                self._engine = self.args.engine(model, self.tokenizer, **self.engine_options)
            if sync:
                self._engine.sync_weights(model)
        else:
            self._engine.sync_weights(model)
        return self._engine

    def close(self) -> None:
        """Shut down the engine this setup built (its ``close()``: a vLLM engine frees its memory and its process
        groups). An engine instance passed in is the caller's and is left open. A later :meth:`engine` call
        builds a new one."""
        if self.injected and self._factory is None:
            return
        engine, self._engine = self._engine, None
        close = getattr(engine, "close", None)
        if callable(close):
            close()

    def verifier(self):
        """The verifier (built once from ``args.verifier`` unless one was given)."""
        if self._verifier is None:
            self._verifier = self.args.make_verifier()
        return self._verifier

    def sample_texts(self, model, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig, *,
                     context=None, transform: Callable[[Prompt], Prompt] | None = None) -> list[list[str]]:
        """:func:`sample_texts` with the engine pointed at ``model`` first (every process must call this)."""
        return sample_texts(self.engine(model), prompts, n, sampling, context=context, transform=transform)
