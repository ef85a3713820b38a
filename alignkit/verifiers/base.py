"""The verifier contract: ``verify(problem, completion) -> Verdict``, batched and time-bounded.

A *problem* is a problems record (``prompt`` plus ``answer`` and/or ``tests``, optional ``solution``);
a *completion* is the model's text (a :class:`~alignkit.rollout.base.Completion` is accepted too).
Verifiers are registered by name (:func:`register_verifier`, :func:`get_verifier`), so a recipe or the
CLI can say ``verifier: math`` and a user can plug in their own callable.

``Verifier.verify_batch`` spreads the calls over worker processes and bounds each call by
``timeout`` seconds (a call that runs over gives ``Verdict(False, 0.0, "timeout: ...")`` and never
stalls the batch). Subclasses implement :meth:`Verifier.verify`; the code verifier overrides
``verify_batch`` because each of its calls is a sandboxed subprocess already.

The worker pool stays warm: it is started on the first parallel batch and reused by every later one
(any verifier, any batch; the verifier travels with each chunk), so a training loop that verifies
every step pays the process start and the imports once; the workers are forked after
:meth:`Verifier.warm_up` has run here, so they start with its imports and caches. Items go to the
workers in contiguous chunks (about four per worker, so a slow chunk does not leave the others
idle); a batch with fewer than ``parallel_min_items`` items per worker runs serially in this
process. :func:`close_worker_pools` ends the pool (it also ends at interpreter exit). A worker that
dies (killed for memory, a crash in C) fails only its chunk (``error: worker process died``): the
other chunks it took down are retried on a new pool.

A plain function ``fn(problem, completion) -> Verdict | bool | float`` is a verifier too: register it
with ``register_verifier("mine", fn)`` and ``get_verifier("mine")`` wraps it in a
:class:`CallableVerifier`. Process-parallel batches need a picklable (module-level) function; a lambda
or a closure is verified serially in-process, with a warning.

The timeout is a ``SIGALRM`` timer, so it interrupts Python code only: one long C call (a huge
big-integer power, say) runs to its end before the timeout is raised.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import numbers
import os
import pickle
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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
    #: the fields a problem needs before this verifier can judge it: at least one group present in full
    #: (``()``: no requirement). A problem without them is an input error, never a wrong answer.
    problem_fields: tuple[tuple[str, ...], ...] = ()
    #: batches with fewer items than this per worker run serially (a chunk's round trip to a warm
    #: worker costs about a millisecond); subclasses whose calls are slow lower it
    parallel_min_items = 32

    def __init__(self, timeout: float = 5.0, num_workers: int | None = None):
        self.timeout = timeout
        self.num_workers = num_workers

    def verify(self, problem: Mapping, completion) -> Verdict:
        raise NotImplementedError

    def same_answer(self, problem: Mapping, first, second) -> bool:
        """Whether two completions of ``problem`` give the same answer, as this verifier reads answers
        (NFR_mc's "the prediction changed" is its negation). The base compares the texts as they are;
        verifiers that extract an answer (math, match) compare the answers."""
        return completion_text(first) == completion_text(second)

    def same_answer_batch(
        self, problems: Sequence[Mapping], firsts: Sequence, seconds: Sequence, *, num_workers: int | None = None
    ) -> list[bool]:
        """:meth:`same_answer` per item, in order, on the worker pool like :meth:`verify_batch` (a call that
        fails or runs out of time counts as a changed answer)."""
        if not len(problems) == len(firsts) == len(seconds):
            raise ValueError(f"{len(problems)} problems, {len(firsts)} first and {len(seconds)} second completions")
        firsts, seconds = [completion_text(c) for c in firsts], [completion_text(c) for c in seconds]
        if type(self).same_answer is Verifier.same_answer:
            return [a == b for a, b in zip(firsts, seconds)]
        pairs = [{**problem, _FIRST_COMPLETION: first} for problem, first in zip(problems, firsts)]
        return [v.correct for v in _SameAnswer(self).verify_batch(pairs, seconds, num_workers=num_workers)]

    def warm_up(self) -> None:
        """Load what every call needs (imports, parser caches). Called in this process just before the
        worker pool is forked from it, so that the workers start warm; the default does nothing."""

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
        workers = min(workers, max(1, len(texts) // max(1, self.parallel_min_items)))
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
        return _verify_in_pool(self, list(problems), texts, workers)


_FIRST_COMPLETION = "__alignkit_first_completion__"


class _SameAnswer(Verifier):
    """``verify(problem, second)``: whether ``problem[_FIRST_COMPLETION]`` and ``second`` give the same
    answer by ``inner``; lets :meth:`Verifier.same_answer_batch` use the batch and pool machinery."""

    def __init__(self, inner: Verifier):
        super().__init__(timeout=inner.timeout, num_workers=inner.num_workers)
        self.inner = inner
        self.name = f"same answer ({inner.name})"
        self.parallel_min_items = inner.parallel_min_items

    def verify(self, problem: Mapping, completion) -> Verdict:
        problem = dict(problem)
        first = problem.pop(_FIRST_COMPLETION)
        same = bool(self.inner.same_answer(problem, first, completion))
        return Verdict(same, float(same), "same answer" if same else "different answer")

    def warm_up(self) -> None:
        self.inner.warm_up()


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # PicklingError, AttributeError ("Can't pickle local object"), TypeError
        return False
    return True


# ------------------------------------------------------------------------------------ the worker pool

_POOL: ProcessPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_OWNER = 0  # the pid that started the pool: a forked child must not use its parent's
_POOL_LOCK = threading.Lock()


def _get_pool(workers: int, verifier: Verifier) -> ProcessPoolExecutor:
    """The warm pool with ``workers`` processes (a pool of another size is closed first)."""
    global _POOL, _POOL_WORKERS, _POOL_OWNER
    if _POOL is not None and _POOL_OWNER != os.getpid():
        _POOL, _POOL_WORKERS = None, 0  # inherited through fork: not ours to use or to shut down
    if _POOL is not None and _POOL_WORKERS != workers:
        close_worker_pools()
    if _POOL is None:
        try:
            verifier.warm_up()  # the workers are forked from this process: they inherit what it loaded
        except Exception as e:  # only a speed-up: the calls themselves will report a real problem
            logger.debug("verifier warm-up failed: %s", e)
        _POOL = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker)
        _POOL_WORKERS, _POOL_OWNER = workers, os.getpid()
    return _POOL


def close_worker_pools() -> None:
    """Shut the warm worker pool down (a later parallel batch starts a new one)."""
    global _POOL, _POOL_WORKERS
    pool, _POOL, _POOL_WORKERS = _POOL, None, 0
    if pool is not None and _POOL_OWNER == os.getpid():
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(close_worker_pools)


def _verify_in_pool(verifier: Verifier, problems: list, texts: list[str], workers: int) -> list[Verdict]:
    """The batch in contiguous chunks on the warm pool. A worker that dies breaks the whole pool; the
    chunks it took down are retried one at a time on a new pool, and the one that kills it again gets
    error verdicts."""
    payload = pickle.dumps(verifier)
    size = max(1, -(-len(texts) // (workers * 4)))
    chunks = [(problems[i : i + size], texts[i : i + size]) for i in range(0, len(texts), size)]
    results: list[list[Verdict] | None] = [None] * len(chunks)
    with _POOL_LOCK:  # one batch at a time (threads): a batch never sees the pool closed under it
        try:
            futures = [_get_pool(workers, verifier).submit(_verify_chunk, payload, *c) for c in chunks]
        except BrokenProcessPool:  # a worker died between batches
            close_worker_pools()
            futures = [_get_pool(workers, verifier).submit(_verify_chunk, payload, *c) for c in chunks]
        for k, future in enumerate(futures):
            try:
                results[k] = future.result()
            except BrokenProcessPool:
                pass
        failed = [k for k, r in enumerate(results) if r is None]
        if failed:
            logger.warning("a verifier worker process died; retrying %d chunk(s) one at a time", len(failed))
            close_worker_pools()
        for k in failed:
            try:
                results[k] = _get_pool(workers, verifier).submit(_verify_chunk, payload, *chunks[k]).result()
            except BrokenProcessPool:
                results[k] = [Verdict(False, 0.0, "error: worker process died")] * len(chunks[k][1])
                close_worker_pools()
    return [v for r in results for v in r]


_WORKER_VERIFIERS: dict[bytes, Verifier] = {}


def _init_worker() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _verify_chunk(payload: bytes, problems, texts) -> list[Verdict]:
    verifier = _WORKER_VERIFIERS.get(payload)
    if verifier is None:
        if len(_WORKER_VERIFIERS) >= 8:
            _WORKER_VERIFIERS.clear()
        verifier = _WORKER_VERIFIERS[payload] = pickle.loads(payload)
    return [verifier.safe_verify(p, t) for p, t in zip(problems, texts)]


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


class UnknownVerifierError(KeyError, ValueError):
    """No verifier is registered under the name asked for (a ``KeyError``, and a ``ValueError``: bad input)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class VerifierOptionError(TypeError, ValueError):
    """Options a verifier does not take (a ``TypeError``, and a ``ValueError``: bad input)."""


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
