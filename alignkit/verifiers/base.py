"""The verifier contract: ``verify(problem, completion) -> Verdict``, batched and time-bounded.

A *problem* is a problems record (``prompt`` plus ``answer`` and/or ``tests``, optional ``solution``);
a *completion* is the model's text (a :class:`~alignkit.rollout.base.Completion` is accepted too).
Verifiers are registered by name (:func:`register_verifier`, :func:`get_verifier`), so a recipe or the
CLI can say ``verifier: math`` and a user can plug in their own callable.

``Verifier.verify_batch`` spreads the calls over worker processes and bounds each call by
``timeout`` seconds (a call that runs over gives ``Verdict(False, 0.0, "timeout: ...")`` and never
stalls the batch). Subclasses implement :meth:`Verifier.verify`; the code verifier overrides
``verify_batch`` because each of its calls is a sandboxed subprocess already.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence


@dataclass(frozen=True)
class Verdict:
    """Whether a completion solves a problem, a score in [0, 1], and a short human-readable reason."""

    correct: bool
    score: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class VerifierTimeout(Exception):
    pass


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    text = getattr(completion, "text", None)
    if isinstance(text, str):
        return text
    if isinstance(completion, Mapping) and isinstance(completion.get("text"), str):
        return completion["text"]
    raise TypeError(f"a completion is text or has a .text, got {type(completion).__name__}")


def _call_with_timeout(fn: Callable[[], Verdict], seconds: float | None) -> Verdict:
    """Run ``fn`` and give up after ``seconds`` (SIGALRM; only in a process's main thread)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn()

    def on_alarm(signum, frame):
        raise VerifierTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    except VerifierTimeout:
        return Verdict(False, 0.0, f"timeout: verification took more than {seconds:g}s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Verifier:
    """Base class. ``timeout`` bounds one call; ``num_workers`` defaults to the CPU count."""

    name = "verifier"

    def __init__(self, timeout: float = 5.0, num_workers: int | None = None):
        self.timeout = timeout
        self.num_workers = num_workers

    def verify(self, problem: Mapping, completion) -> Verdict:
        raise NotImplementedError

    def safe_verify(self, problem: Mapping, completion) -> Verdict:
        """``verify`` bounded by ``timeout``; an exception becomes an incorrect verdict naming it."""
        try:
            return _call_with_timeout(lambda: self.verify(problem, completion_text(completion)), self.timeout)
        except Exception as e:  # a verifier bug must not lose the batch
            return Verdict(False, 0.0, f"error: {type(e).__name__}: {e}")

    def verify_batch(
        self, problems: Sequence[Mapping], completions: Sequence, *, num_workers: int | None = None
    ) -> list[Verdict]:
        """One verdict per (problem, completion) pair, in order, computed in parallel processes."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        texts = [completion_text(c) for c in completions]
        workers = num_workers if num_workers is not None else self.num_workers
        if workers is None:
            workers = os.cpu_count() or 1
        workers = min(workers, max(1, len(texts) // 64))  # small batches are not worth a process pool
        if workers <= 1:
            return [self.safe_verify(p, t) for p, t in zip(problems, texts)]
        chunk = max(1, -(-len(texts) // (workers * 4)))
        pieces = [(list(problems[i : i + chunk]), texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(self,)) as pool:
            out: list[Verdict] = []
            for verdicts in pool.map(_verify_chunk, pieces):
                out.extend(verdicts)
        return out


_WORKER_VERIFIER: Verifier | None = None


def _init_worker(verifier: Verifier) -> None:
    global _WORKER_VERIFIER
    _WORKER_VERIFIER = verifier


def _verify_chunk(piece) -> list[Verdict]:
    problems, texts = piece
    return [_WORKER_VERIFIER.safe_verify(p, t) for p, t in zip(problems, texts)]


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Callable[..., Verifier]] = {}


def register_verifier(name: str, factory: Callable[..., Verifier] | None = None):
    """Register a verifier class or factory under ``name`` (usable as a decorator)."""

    def add(f):
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def get_verifier(name: str, **kwargs) -> Verifier:
    """The verifier registered under ``name``, built with ``kwargs``."""
    from alignkit.verifiers import _load_builtin  # noqa: F401  (registers math, match, code)

    if name not in _REGISTRY:
        raise KeyError(f"unknown verifier {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def registered_verifiers() -> list[str]:
    from alignkit.verifiers import _load_builtin  # noqa: F401

    return sorted(_REGISTRY)
