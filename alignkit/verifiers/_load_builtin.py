"""Importing this module registers the built-in verifiers: ``math``, ``match`` and (when present) ``code``."""

import importlib
import logging

from alignkit.verifiers import match, math  # noqa: F401  (each registers itself)

try:
    importlib.import_module("alignkit.verifiers.code")
except ImportError as e:
    # No code verifier module: nothing to say. A dependency missing inside it: say so, keep the others.
    if getattr(e, "name", None) != "alignkit.verifiers.code":
        logging.getLogger(__name__).warning("the 'code' verifier is unavailable: %s", e)
