"""The verifier registry's lookup: :func:`get_verifier` and :func:`registered_verifiers`.

Verifiers register themselves with :func:`alignkit.verifiers.base.register_verifier`; the built-in ones
(``math``, ``match``, ``code``) are loaded on the first lookup (:mod:`alignkit.verifiers._load_builtin`,
imported then: the code verifier's sandbox is not loaded by ``import alignkit.verifiers``). The lookup lives
here, above the verifiers it loads, so that no module imports one that imports it back.
"""

from __future__ import annotations

import inspect
from typing import Callable

from alignkit.verifiers.base import _REGISTRY, CallableVerifier, UnknownVerifierError, Verifier, VerifierOptionError


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
    ``timeout``, ``num_workers``). :class:`UnknownVerifierError` (a ``KeyError``) naming the registered
    verifiers for an unknown name; :class:`VerifierOptionError` (a ``TypeError``) for options it does not take.
    """
    from alignkit.verifiers import _load_builtin  # noqa: F401  (registers math, match, code; lazy: the sandbox)

    if name not in _REGISTRY:
        raise UnknownVerifierError(unknown_verifier_message(name))
    entry = _REGISTRY[name]
    if isinstance(entry, Verifier):
        if kwargs:
            raise VerifierOptionError(f"verifier {name!r} is a registered instance; it takes no options, got {sorted(kwargs)}")
        return entry
    try:
        if isinstance(entry, type) and issubclass(entry, Verifier):
            return entry(**kwargs)
        if _is_check_function(entry):
            return CallableVerifier(entry, name=name, **kwargs)
        verifier = entry(**kwargs)
    except TypeError as e:  # an option it does not take (or of the wrong type)
        raise VerifierOptionError(f"verifier {name!r}: {e}") from None
    if not isinstance(verifier, Verifier):
        raise TypeError(
            f"the factory registered as {name!r} returned {type(verifier).__name__}, not a Verifier; "
            "register a check function fn(problem, completion) or a factory returning a Verifier"
        )
    return verifier


def registered_verifiers() -> list[str]:
    from alignkit.verifiers import _load_builtin  # noqa: F401  (lazy, as in get_verifier)

    return sorted(_REGISTRY)


def unknown_verifier_message(name: str) -> str:
    """What an unknown verifier name is told, in ``get_verifier``'s error and in the CLI's early check: the
    registered names and the close ones."""
    from alignkit.did_you_mean import did_you_mean

    names = registered_verifiers()
    return f"unknown verifier {name!r}{did_you_mean(name, names)}; registered: {names}"
