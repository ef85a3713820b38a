"""Verifiers: label a completion of a problem correct or incorrect (see :mod:`alignkit.verifiers.base`).

Built-in names: ``math`` (:class:`~alignkit.verifiers.math.MathVerifier`), ``match``
(:class:`~alignkit.verifiers.match.MatchVerifier`) and ``code`` (the sandboxed
:class:`~alignkit.verifiers.code.CodeVerifier`). A plain function registered with
``register_verifier(name, fn)`` is wrapped in a :class:`CallableVerifier`.
"""

from alignkit.verifiers.base import CallableVerifier, Verdict, Verifier, register_verifier
from alignkit.verifiers.registry import get_verifier, registered_verifiers

__all__ = ["CallableVerifier", "Verdict", "Verifier", "get_verifier", "register_verifier", "registered_verifiers"]
