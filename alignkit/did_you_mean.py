""""Did you mean ...?" for a mistyped name: a recipe key, a ``--key`` override, a command, a verifier.

``difflib.get_close_matches`` (ratio >= 0.6, the standard library's default cut-off) picks the candidates.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices closest to ``word``, best first (at most ``n``; none when nothing is close)."""
    choices = list(choices)
    found = difflib.get_close_matches(word, choices, n=n)
    if not found:  # a case slip: Beta, MATH
        found = [c for c in choices if c.lower() == word.lower()][:n]
    return found


def did_you_mean(word: str, choices: Iterable[str], *, prefix: str = "") -> str:
    """``"; did you mean 'beta'?"`` (or ``"; did you mean 'a' or 'b'?"``), ``""`` when nothing is close.
    ``prefix`` is written before each candidate (``--`` for options)."""
    found = close_matches(word, choices)
    if not found:
        return ""
    quoted = [f"'{prefix}{c}'" for c in found]
    return "; did you mean " + (" or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else quoted[0]) + "?"
