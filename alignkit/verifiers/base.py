"""The verifier contract: ``verify(problem, completion) -> Verdict``, batched and time-bounded.

A *problem* is a problems record (``prompt`` plus ``answer`` and/or ``tests``, optional ``solution``);
a *completion* is the model's text (a :class:`~alignkit.rollout.base.Completion` is accepted too).
Verifiers are registered by name (:func:`register_verifier`, :func:`get_verifier`), so a recipe or the
CLI can say ``verifier: math`` and a user can plug in their own callable.

``Verifier.verify_batch`` spreads the calls over worker processes and bounds each call by
``timeout`` seconds (a call that runs over gives ``Verdict(False, 0.0, "timeout: ...")`` and never
stalls the batch). Subclasses implement :meth:`Verifier.verify`; the code verifier overrides
``verify_batch`` because each of its calls is a sandboxed subprocess already.

A plain function ``fn(problem, completion) -> Verdict | bool | float`` is a verifier too: register it
with ``register_verifier("mine", fn)`` and ``get_verifier("mine")`` wraps it in a
:class:`CallableVerifier`. Process-parallel batches need a picklable (module-level) function; a lambda
or a closure is verified serially in-process, with a warning.

The timeout is a ``SIGALRM`` timer, so it interrupts Python code only: one long C call (a huge
big-integer power, say) runs to its end before the timeout is raised.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
import os
import pickle
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Whether a completion solves a problem, a score in [0, 1], and a short human-readable reason."""

    correct: bool
    score: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class VerifierTimeout(BaseException):
    """Raised by the timer inside a verifier call that ran out of time.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that the ``except Exception`` blocks of the
    libraries a verifier calls (math-verify, SymPy) cannot swallow it and carry on past the bound.
    """


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
        except VerifierTimeout:  # the timer fired just as the call returned
            return Verdict(False, 0.0, f"timeout: verification took more than {self.timeout:g}s")
        except Exception as e:  # a verifier bug must not lose the batch
            return Verdict(False, 0.0, f"error: {type(e).__name__}: {e}")

    def _batch_texts(self, problems, completions, num_workers: int | None) -> tuple[list[str], int]:
        """The completions' texts, and the workers asked for (argument, then constructor, then CPU count)."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        texts = [completion_text(c) for c in completions]
        workers = num_workers if num_workers is not None else self.num_workers
        return texts, int(workers if workers is not None else (os.cpu_count() or 1))

    def verify_batch(
        self, problems: Sequence[Mapping], completions: Sequence, *, num_workers: int | None = None
    ) -> list[Verdict]:
        """One verdict per (problem, completion) pair, in order, computed in parallel processes."""
        texts, workers = self._batch_texts(problems, completions, num_workers)
        workers = min(workers, max(1, len(texts) // 64))  # small batches are not worth a process pool
        if workers > 1 and not _picklable(self):
            logger.warning(
                "verifier %r cannot be pickled (a lambda or closure?), so it cannot go to worker processes; "
                "verifying %d items serially in this process. Register a module-level function to run in parallel.",
                self.name,
                len(texts),
            )
            workers = 1
        if workers <= 1:
            return [self.safe_verify(p, t) for p, t in zip(problems, texts)]
        chunk = max(1, -(-len(texts) // (workers * 4)))
        pieces = [(list(problems[i : i + chunk]), texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(self,)) as pool:
            out: list[Verdict] = []
            for verdicts in pool.map(_verify_chunk, pieces):
                out.extend(verdicts)
        return out


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # PicklingError, AttributeError ("Can't pickle local object"), TypeError
        return False
    return True


_WORKER_VERIFIER: Verifier | None = None


def _init_worker(verifier: Verifier) -> None:
    global _WORKER_VERIFIER
    _WORKER_VERIFIER = verifier


def _verify_chunk(piece) -> list[Verdict]:
    problems, texts = piece
    return [_WORKER_VERIFIER.safe_verify(p, t) for p, t in zip(problems, texts)]


# ------------------------------------------------------------------------------------ custom callables


def to_verdict(result: Any, threshold: float = 0.5) -> Verdict:
    """A user check's result as a :class:`Verdict`.

    A ``Verdict`` is kept; a ``bool`` gives score 1 or 0; a number is the score (in [0, 1]) and counts
    as correct when it is at least ``threshold``. Anything else is a ``TypeError``.
    """
    if isinstance(result, Verdict):
        return result
    if isinstance(result, bool) or type(result).__name__ in ("bool", "bool_"):  # numpy booleans too
        correct = bool(result)
        return Verdict(correct, 1.0 if correct else 0.0, "correct" if correct else "incorrect")
    if isinstance(result, numbers.Real):
        score = float(result)
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"a verifier's score must be in [0, 1], got {score!r}")
        correct = score >= threshold
        return Verdict(correct, score, f"score {score:g} {'>=' if correct else '<'} threshold {threshold:g}")
    raise TypeError(f"a verifier function returns a Verdict, a bool or a number, got {type(result).__name__}")


class CallableVerifier(Verifier):
    """Wraps ``fn(problem, completion_text) -> Verdict | bool | float`` as a :class:`Verifier`.

    A float result is a score: correct when ``>= threshold``. ``fn`` must be picklable (a module-level
    function) for :meth:`~Verifier.verify_batch` to use worker processes; otherwise the batch runs
    serially in this process.
    """

    def __init__(
        self,
        fn: Callable[[Mapping, str], Any],
        *,
        threshold: float = 0.5,
        name: str | None = None,
        timeout: float = 5.0,
        num_workers: int | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"CallableVerifier wraps a callable, got {type(fn).__name__}")
        super().__init__(timeout=timeout, num_workers=num_workers)
        self.fn = fn
        self.threshold = threshold
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def verify(self, problem: Mapping, completion) -> Verdict:
        return to_verdict(self.fn(problem, completion), self.threshold)


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Any] = {}


def register_verifier(name: str, factory: Callable | Verifier | None = None):
    """Register a verifier under ``name`` (usable as a decorator).

    ``factory`` is one of: a :class:`Verifier` subclass or a factory function returning a Verifier
    (built with :func:`get_verifier`'s keyword arguments); a Verifier instance (returned as is); or a
    plain check function ``fn(problem, completion)`` returning a Verdict, a bool or a score, which
    :func:`get_verifier` wraps in a :class:`CallableVerifier`. A function with two or more required
    positional parameters is taken for a check function, one whose parameters all have defaults (or
    are keyword-only) for a factory.
    """

    def add(f):
        if not (isinstance(f, Verifier) or callable(f)):
            raise TypeError(f"register_verifier({name!r}, ...) needs a Verifier class, instance or a callable")
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def _is_check_function(fn: Callable) -> bool:
    """Whether ``fn`` looks like ``fn(problem, completion)`` rather than a factory ``fn(**options)``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume a check function
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
    takes_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    return len(required) >= 2 or takes_varargs


def get_verifier(name: str, **kwargs) -> Verifier:
    """The verifier registered under ``name``, built with ``kwargs``.

    A registered check function is wrapped in a :class:`CallableVerifier` (``kwargs``: ``threshold``,
    ``timeout``, ``num_workers``). ``KeyError`` naming the registered verifiers for an unknown name.
    """
    from alignkit.verifiers import _load_builtin  # noqa: F401  (registers math, match, code)

    if name not in _REGISTRY:
        raise KeyError(f"unknown verifier {name!r}; registered: {sorted(_REGISTRY)}")
    entry = _REGISTRY[name]
    if isinstance(entry, Verifier):
        if kwargs:
            raise TypeError(f"verifier {name!r} is a registered instance; it takes no options, got {sorted(kwargs)}")
        return entry
    if isinstance(entry, type) and issubclass(entry, Verifier):
        return entry(**kwargs)
    if _is_check_function(entry):
        return CallableVerifier(entry, name=name, **kwargs)
    verifier = entry(**kwargs)
    if not isinstance(verifier, Verifier):
        raise TypeError(
            f"the factory registered as {name!r} returned {type(verifier).__name__}, not a Verifier; "
            "register a check function fn(problem, completion) or a factory returning a Verifier"
        )
    return verifier


def parse_verifier_options(items: list[str]) -> dict:
    """``KEY=VALUE`` command-line settings of a verifier (values parsed as JSON when they can be);
    ``ValueError`` for an item without a key or ``=``."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--verifier_option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def registered_verifiers() -> list[str]:
    from alignkit.verifiers import _load_builtin  # noqa: F401

    return sorted(_REGISTRY)
