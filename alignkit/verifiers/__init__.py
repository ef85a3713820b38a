"""Verifiers: label a completion of a problem correct or incorrect (see :mod:`alignkit.verifiers.base`)."""

from alignkit.verifiers.base import Verdict, Verifier, get_verifier, register_verifier, registered_verifiers

__all__ = ["Verdict", "Verifier", "get_verifier", "register_verifier", "registered_verifiers"]
