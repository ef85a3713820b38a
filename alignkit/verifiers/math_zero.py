"""math-verify's last comparison, ``simplify(gold - pred).is_zero``, decided without ``simplify`` when
the answer is certain.

math-verify ends its comparison of two expressions (``math_verify.grader.sympy_symbolic_eq``) with
``simplify(a - b)``, which costs 5-80 ms even for a quadratic. Two kinds of difference have a cheap
exact answer, and for them :func:`certain_zero` gives the verdict that call would give:

* **A rational function over the rationals** (only symbols, rational numbers, ``+``, ``*`` and integer
  powers, as ``(x+3)^2 - (x^2+6x+9)``): written as one fraction, it is identically zero exactly when
  its numerator expands to 0 (expanding a polynomial over the rationals gives its canonical form),
  and ``simplify`` then finds that 0 too (it tries ``cancel``). A non-zero rational function is not
  zero for every value of its symbols, so no simplification of it can be zero.
* **A number with no symbols** (``35\\sqrt{21} - \\sqrt{25726}``): ``evalf(strict=True)`` either
  certifies its leading digits or raises; a certified non-zero value is not zero, whatever form
  ``simplify`` gives it.

Everything else (a number too close to zero to tell, functions, radicals of symbols, matrices)
returns ``None`` and goes to ``simplify`` as before. :func:`exact_shortcuts` turns this on around a
call of math-verify's ``verify``: the replacement installed in ``math_verify.grader`` takes the
shortcut only there (a context variable), so math-verify called anywhere else in the process, the
tests' reference included, runs unchanged. ``tests/test_math_zero.py`` checks every decided
verdict against ``simplify``'s.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

__all__ = ["certain_zero", "exact_shortcuts"]

_ACTIVE = contextvars.ContextVar("alignkit_math_exact_shortcuts", default=False)
_INSTALLED: dict = {}


def _is_rational_function_over_q(expr) -> bool:
    """Only symbols, rational numbers, sums, products and integer powers in ``expr``."""
    from sympy import Add, Mul, Pow, Rational, Symbol, preorder_traversal

    for node in preorder_traversal(expr):
        if isinstance(node, (Add, Mul, Symbol, Rational)):
            continue
        if isinstance(node, Pow) and node.exp.is_Integer:
            continue
        return False
    return True


def certain_zero(a, b) -> bool | None:
    """``simplify(a - b).is_zero`` as math-verify tests it, when that is certain without ``simplify``
    (see the module docstring); ``None`` when only ``simplify`` can tell."""
    from sympy import Basic, expand

    if not (isinstance(a, Basic) and isinstance(b, Basic)):
        return None  # matrices and anything else: simplify's business
    try:
        difference = a - b
        if difference == 0:
            return True  # simplify(0) is 0
        if difference.free_symbols:
            if not _is_rational_function_over_q(difference):
                return None
            numerator, _ = difference.as_numer_denom()
            return expand(numerator) == 0
        if not difference.is_number:
            return None
        value = difference.evalf(15, strict=True)
    except Exception:  # PrecisionExhausted: too close to zero to tell numerically; anything else: simplify's
        return None
    if value.is_finite and value != 0:
        return False  # a certified non-zero value
    return None


def _symbolic_eq_with_shortcuts(a, b) -> bool:
    """``math_verify.grader.sympy_symbolic_eq``, with :func:`certain_zero` first inside :func:`exact_shortcuts`."""
    if _ACTIVE.get():
        decided = certain_zero(a, b)
        if decided is not None:
            return decided
    return _INSTALLED["original"](a, b)


def _install() -> None:
    """Put the replacement in place once; a math-verify without ``sympy_symbolic_eq`` is left as it is
    (no shortcut, the same verdicts)."""
    from math_verify import grader

    current = getattr(grader, "sympy_symbolic_eq", None)
    if current is not None and current is not _symbolic_eq_with_shortcuts:
        _INSTALLED["original"] = grader.sympy_symbolic_eq
        grader.sympy_symbolic_eq = _symbolic_eq_with_shortcuts


@contextlib.contextmanager
def exact_shortcuts() -> Iterator[None]:
    """Within this block (this thread or task), math-verify's symbolic comparison tries :func:`certain_zero`
    before ``simplify``."""
    _install()
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
