"""A problem's tests as sandbox steps, judged in the parent: :func:`plan_tests` -> :class:`TestPlan`.

The code verifier must not let the program it checks decide its own verdict. So a test is not run
inside the program's process with its result reported back; it is taken apart here:

    assert add(2, 3) == 5          ->  the sandbox evaluates  add(2, 3)  and returns plain data;
                                       this process checks  value == 5

The expected value (``5``) never enters the sandbox, and the sandbox returns only plain data (numbers,
strings, bytes, lists, tuples, dicts, sets, ``None``, booleans, ``Fraction``/``Decimal``), so nothing
the program does in its own address space, file descriptors or frames can turn a wrong answer into a
pass: an object whose ``__eq__`` is always true is not plain data, patched ``builtins`` or
``unittest`` are never used here, and a forged report can only carry answers, which are compared
with values the program never saw.

What is taken apart (the *outside* tests):

- ``assert`` statements of any boolean shape (``==``, ``!=``, ``<``..., ``in``, ``is None/True/False``,
  ``and``/``or``/``not``, chains, ``math.isclose``, ``abs(f(x) - y) < tol``, ``round(...)``,
  ``sorted(...)``, ``len(...)``, ``isinstance(..., int)``...). The program's side (a maximal
  subexpression with no expected value in it, e.g. ``sorted(f(x))``) is evaluated in the sandbox;
  arithmetic and the built-ins above applied to it together with a constant are computed here.
- a test program made of imports, constant assignments, such asserts, a ``def check(candidate):``
  of asserts called as ``check(f)`` (HumanEval's shape), ``unittest.TestCase`` classes whose test
  methods are ``self.assertEqual``/``assertTrue``/``assertAlmostEqual``/... calls (run when
  ``unittest.main()`` is reached), ``if __name__ == "__main__":`` and ``sys.exit(0)``.

Anything else (loops, helper functions, ``setUp``, ``assertRaises``, variables computed from the
program...) runs inside the sandbox as an ``exec`` step, as a general test program must: its result
is the program's own word, and every verdict that rests on one says so
(:attr:`TestOutcome.outside` is False).
"""

from __future__ import annotations

import ast
import copy
import decimal
import fractions
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from alignkit.verifiers.sandbox import Step, StepResult

__all__ = ["TestOutcome", "TestPlan", "plan_tests"]


@dataclass(frozen=True)
class TestOutcome:
    """One test's verdict: passed or not, judged outside the program or on its word, and why not."""

    passed: bool
    outside: bool
    error_type: str | None = None
    error: str | None = None


class _Failed(Exception):
    """A check failed: (exception type name, message)."""

    def __init__(self, error_type: str, message: str = ""):
        super().__init__(error_type, message)
        self.error_type, self.message = error_type, message


class _NotOutside(Exception):
    """This test cannot be judged outside the program."""


_Eval = Callable[[Sequence[StepResult]], object]


@dataclass
class _Test:
    label: str
    outside: bool = True
    setup: list[int] = field(default_factory=list)  # exec steps that must not raise
    checks: list[tuple[str, _Eval]] = field(default_factory=list)  # (source, evaluator)
    exec_step: int | None = None  # the in-process step
    fail_now: tuple[str, str] | None = None
    constants_used: set[str] = field(default_factory=set)


@dataclass
class TestPlan:
    """The steps to run in the sandbox and how to judge their results; see :func:`plan_tests`."""

    steps: list[Step]
    tests: list[_Test]
    text_program: bool

    @property
    def outside(self) -> bool:
        """Every test is judged outside the program."""
        return all(t.outside for t in self.tests)

    def judge(self, results: Sequence[StepResult]) -> list[TestOutcome]:
        """One outcome per test from the sandbox's step results (one per step)."""
        if len(results) != len(self.steps):
            raise ValueError(f"{len(self.steps)} steps but {len(results)} results")
        return [self._judge_one(t, results) for t in self.tests]

    @staticmethod
    def _judge_one(test: _Test, results: Sequence[StepResult]) -> TestOutcome:
        if test.fail_now is not None:
            return TestOutcome(False, test.outside, *test.fail_now)
        if test.exec_step is not None:
            r = results[test.exec_step]
            return TestOutcome(r.ok, False, r.error_type, r.error)
        for i in test.setup:
            r = results[i]
            if not r.ok:
                return TestOutcome(False, test.outside, r.error_type, r.error)
        for source, evaluate in test.checks:
            try:
                value = evaluate(results)
                if not value:  # plain data: no program code runs here
                    raise _Failed("AssertionError", _failure_detail(source, evaluate, results))
            except _Failed as e:
                return TestOutcome(False, test.outside, e.error_type, e.message)
            except (ArithmeticError, TypeError, ValueError, RecursionError, MemoryError, KeyError, IndexError) as e:
                return TestOutcome(False, test.outside, type(e).__name__, str(e)[:300])
        return TestOutcome(True, test.outside)


def _failure_detail(source: str, evaluate: _Eval, results: Sequence[StepResult]) -> str:
    probes = getattr(evaluate, "probes", ())
    shown = []
    for text, index in probes[:3]:
        r = results[index]
        if r.ok:
            shown.append(f"{_short(text, 60)} = {_short(_safe_repr(r.value), 80)}")
    return f"got {'; '.join(shown)}" if shown else _short(source, 120)


def _safe_repr(value) -> str:
    try:
        return repr(value)
    except (ValueError, RecursionError):  # a huge int, a deep structure
        return f"<{type(value).__name__}>"


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ------------------------------------------------------------------------------------ parent-side values

_MAX_SEQ = 10_000_000
_MAX_INT_BITS = 1_000_000


def _is_number(x) -> bool:
    return type(x) in (int, float, complex, bool, fractions.Fraction, decimal.Decimal)


def _safe_binop(op: ast.operator, a, b):
    """``a <op> b`` on plain data, refusing results that would be too large to build here."""
    if isinstance(op, ast.Pow):
        if not (_is_number(a) and _is_number(b)):
            raise TypeError("** on non-numbers")
        if type(a) is int and type(b) is int and b > 0 and max(1, a.bit_length()) * b > _MAX_INT_BITS:
            raise OverflowError("the power is too large to compute")
        return a ** b
    if isinstance(op, ast.Mult):
        for seq, k in ((a, b), (b, a)):
            if type(seq) in (str, bytes, list, tuple) and type(k) in (int, bool) and len(seq) * max(0, k) > _MAX_SEQ:
                raise OverflowError("the repeated sequence is too large")
        if type(a) is int and type(b) is int and a.bit_length() + b.bit_length() > 8 * _MAX_INT_BITS:
            raise OverflowError("the product is too large")
    if isinstance(op, ast.LShift):
        if type(b) is int and b > _MAX_INT_BITS:
            raise OverflowError("the shift is too large")
    if isinstance(op, ast.Mod) and not _is_number(a):
        raise TypeError("% is computed here for numbers only")
    if isinstance(op, ast.MatMult):
        raise TypeError("@ is not computed here")
    return _BINOPS[type(op)](a, b)


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
    ast.BitXor: operator.xor, ast.BitAnd: operator.and_,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_SINGLETONS = (None, True, False, Ellipsis)


def _range(*args):
    r = range(*args)
    if len(r) > _MAX_SEQ:
        raise OverflowError("the range is too long")
    return r


def _round(x, ndigits=None):
    if ndigits is not None and (type(ndigits) is not int or abs(ndigits) > 10_000):
        raise ValueError("round() digits out of range here")
    return round(x) if ndigits is None else round(x, ndigits)


def _almost_equal(first, second, places=None, msg=None, delta=None) -> bool:
    """``unittest.TestCase.assertAlmostEqual``'s test."""
    if first == second:
        return True
    if delta is not None and places is not None:
        raise TypeError("specify delta or places not both")
    diff = abs(first - second)
    if delta is not None:
        return diff <= delta
    return round(diff, 7 if places is None else places) == 0


def _not_almost_equal(first, second, places=None, msg=None, delta=None) -> bool:
    if delta is not None and places is not None:
        raise TypeError("specify delta or places not both")
    if first == second:
        return False
    diff = abs(first - second)
    if delta is not None:
        return diff > delta
    return round(diff, 7 if places is None else places) != 0


def _count_equal(first, second, msg=None) -> bool:
    """``assertCountEqual``: the same elements, the same number of times, in any order."""
    a, b = list(first), list(second)
    try:
        from collections import Counter

        return Counter(a) == Counter(b)
    except TypeError:  # unhashable elements
        for x in a:
            for j, y in enumerate(b):
                if x == y:
                    del b[j]
                    break
            else:
                return False
        return not b


def _typed_equal(kind: type):
    def check(first, second, msg=None, seq_type=None) -> bool:
        return isinstance(first, kind) and isinstance(second, kind) and first == second

    return check


def _sequence_equal(first, second, msg=None, seq_type=None) -> bool:
    if seq_type is not None and not (isinstance(first, seq_type) and isinstance(second, seq_type)):
        return False
    return len(first) == len(second) and all(x == y for x, y in zip(first, second))


def _isclose(a, b, *, rel_tol=1e-09, abs_tol=0.0) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


_TYPES = {"int": int, "float": float, "str": str, "list": list, "tuple": tuple, "dict": dict, "set": set,
          "frozenset": frozenset, "bool": bool, "bytes": bytes, "bytearray": bytearray, "complex": complex}

#: built-ins (and helpers) this process computes on plain data
_FUNCS: dict[str, Callable] = {
    "abs": abs, "round": _round, "len": len, "sorted": sorted, "min": min, "max": max, "sum": sum,
    "any": any, "all": all, "reversed": reversed, "range": _range, "isinstance": isinstance, "type": type,
    **_TYPES,
    "__alignkit_almost_equal": _almost_equal, "__alignkit_not_almost_equal": _not_almost_equal,
    "__alignkit_count_equal": _count_equal, "__alignkit_list_equal": _typed_equal(list),
    "__alignkit_tuple_equal": _typed_equal(tuple), "__alignkit_dict_equal": _typed_equal(dict),
    "__alignkit_set_equal": _typed_equal((set, frozenset)), "__alignkit_str_equal": _typed_equal(str),
    "__alignkit_sequence_equal": _sequence_equal,
}
_MATH = {"isclose": _isclose, "sqrt": math.sqrt, "floor": math.floor, "ceil": math.ceil, "fabs": math.fabs,
         "log": math.log, "exp": math.exp, "log2": math.log2, "log10": math.log10, "gcd": math.gcd,
         "pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf, "nan": math.nan}
_IMPORTABLE = {"math": _MATH, "fractions": {"Fraction": fractions.Fraction}, "decimal": {"Decimal": decimal.Decimal}}


# ------------------------------------------------------------------------------------ translation


class _Translator:
    """Translates one test's statements into steps and parent-side checks (see the module docstring)."""

    def __init__(self, plan_steps: list[Step], constants: dict, names: dict, constants_to_child: bool):
        self.steps = plan_steps
        self.constants = constants  # name -> (value, ast node of its literal)
        self.names = names  # name -> parent-side object (math functions, modules' namespaces)
        self.constants_to_child = constants_to_child
        self.subst: dict[str, ast.expr] = {}
        self.imported: set[str] = set()  # names the tests' own imports bind (library code in the sandbox)
        self.test = _Test(label="")
        self.probes: list[tuple[str, int]] = []

    # ---- constants (values computable here, with no program name in them)

    def const(self, node: ast.expr):
        """The value of ``node`` if it is computable here; raises ``_NotConst`` otherwise."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.subst:
                return self.const(self.subst[node.id])
            if node.id in self.constants:
                self.test.constants_used.add(node.id)
                return self.constants[node.id][0]
            if node.id in _TYPES:
                return _TYPES[node.id]
            value = self.names.get(node.id)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value  # math.pi & co. imported by name
            raise _NotConst
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            space = self.names.get(node.value.id)
            if isinstance(space, dict) and isinstance(space.get(node.attr), (int, float)):
                return space[node.attr]
            raise _NotConst
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            if any(isinstance(e, ast.Starred) for e in node.elts):
                raise _NotConst
            items = [self.const(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else list(items) if isinstance(node, ast.List) else set(items)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise _NotConst
            return {self.const(k): self.const(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.const(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _safe_binop(node.op, self.const(node.left), self.const(node.right))
        if isinstance(node, ast.Call):
            fn = self.function(node.func)
            if fn is None or any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                raise _NotConst
            return fn(*[self.const(a) for a in node.args], **{k.arg: self.const(k.value) for k in node.keywords})
        raise _NotConst

    def is_const(self, node: ast.expr) -> bool:
        try:
            self.const(node)
            return True
        except _NotConst:
            return False
        except Exception:  # computable here, but it raises (1/0): the test fails as it would inside
            return True

    def function(self, func: ast.expr) -> Callable | None:
        """The parent-side function ``func`` names (a built-in above, ``math.*``), or ``None``."""
        if isinstance(func, ast.Name):
            if func.id in self.subst or func.id in self.constants:
                return None
            if func.id in _FUNCS:
                return _FUNCS[func.id]
            value = self.names.get(func.id)
            return value if callable(value) else None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            space = self.names.get(func.value.id)
            if isinstance(space, dict) and callable(space.get(func.attr)):
                return space[func.attr]
        return None

    # ---- the program's side

    def mixes(self, node: ast.expr) -> bool:
        """Whether ``node`` combines the program's values with a constant through an operation this
        process computes (so the constant, maybe an expected value, must stay here)."""
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            parts = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            parts = [node.operand]
        elif isinstance(node, ast.Call) and self.function(node.func) is not None:
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                return False
            if self.function(node.func) is type:  # a type is not plain data: always compared here
                return True
            if not all(self.is_const(k.value) for k in node.keywords):
                return False  # sorted(x, key=len): the whole call runs inside
            parts = [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(node, (ast.Tuple, ast.List)):
            if any(isinstance(e, ast.Starred) for e in node.elts):
                return False
            parts = list(node.elts)
        else:
            return False
        return any(self.is_const(p) or self.mixes(p) for p in parts)

    def value(self, node: ast.expr) -> _Eval:
        """An evaluator for ``node``'s value: a constant, computed here, or a probe in the sandbox."""
        if self.is_const(node):
            try:
                v = self.const(node)
            except _NotConst:  # pragma: no cover  (is_const said otherwise)
                raise
            except Exception as e:
                err = _Failed(type(e).__name__, str(e)[:300])

                def raising(results, err=err):
                    raise err

                return raising
            return lambda results, v=v: v
        if self.mixes(node):
            if isinstance(node, ast.BinOp):
                left, right, op = self.value(node.left), self.value(node.right), node.op
                return lambda results: _safe_binop(op, left(results), right(results))
            if isinstance(node, ast.UnaryOp):
                inner, fn = self.value(node.operand), _UNARY[type(node.op)]
                return lambda results: fn(inner(results))
            if isinstance(node, (ast.Tuple, ast.List)):
                items, kind = [self.value(e) for e in node.elts], tuple if isinstance(node, ast.Tuple) else list
                return lambda results: kind(f(results) for f in items)
            fn = self.function(node.func)
            args = [self.value(a) for a in node.args]
            kwargs = {k.arg: self.const(k.value) for k in node.keywords}
            return lambda results: fn(*[a(results) for a in args], **kwargs)
        return self.probe(node, "eval")

    def probe(self, node: ast.expr, kind: str) -> _Eval:
        source = ast.unparse(self.substituted(node))
        self.check_child_names(node)
        self.check_no_comparison_inside(node)
        index = len(self.steps)
        self.steps.append(Step(kind, source))
        self.probes.append((source, index))

        def fetch(results, index=index):
            r = results[index]
            if not r.ok:
                raise _Failed(r.error_type or "Exception", r.error or "")
            return r.value

        return fetch

    def check_child_names(self, node: ast.expr) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id == "self":
                raise _NotOutside("uses self")
            if isinstance(sub, (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
                raise _NotOutside("a walrus or await in a test expression")
            if isinstance(sub, ast.Name) and sub.id in self.constants:
                self.test.constants_used.add(sub.id)

    def check_no_comparison_inside(self, node: ast.expr) -> None:
        """A probe runs in the sandbox, so it must not compare the program's values with expected
        ones there: no comparison inside it, and no library function of the tests' imports applied
        to the program's values together with a constant (``np.array_equal(f(x), [1, 2])``)."""
        for sub in ast.walk(node):
            if isinstance(sub, ast.Compare):
                raise _NotOutside("a comparison inside the program's side of a test")
            if isinstance(sub, ast.Call) and self.imported_callee(sub.func) and not self.is_const(sub):
                args = [*sub.args, *(k.value for k in sub.keywords)]
                if any(not isinstance(a, ast.Starred) and self.is_const(a) for a in args):
                    raise _NotOutside("a library call on the program's values and a constant")

    def imported_callee(self, func: ast.expr) -> bool:
        while isinstance(func, ast.Attribute):
            func = func.value
        return isinstance(func, ast.Name) and func.id in self.imported and func.id not in self.subst

    def substituted(self, node: ast.expr) -> ast.expr:
        subst, constants = self.subst, self.constants

        class Inline(ast.NodeTransformer):
            def visit_Name(self, n):
                if n.id in subst:
                    return copy.deepcopy(subst[n.id])
                if n.id in constants and isinstance(n.ctx, ast.Load):
                    return copy.deepcopy(constants[n.id][1])
                return n

        return Inline().visit(copy.deepcopy(node))

    # ---- assertions

    def condition(self, node: ast.expr) -> _Eval:
        """An evaluator for the truth of an assertion's test expression."""
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(v) for v in node.values]
            if isinstance(node.op, ast.And):
                def all_of(results):
                    value = True
                    for p in parts:
                        value = p(results)
                        if not value:
                            return value
                    return value
                return all_of

            def any_of(results):
                value = False
                for p in parts:
                    value = p(results)
                    if value:
                        return value
                return value
            return any_of
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.condition(node.operand)
            return lambda results: not inner(results)
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, (a, b) in zip(node.ops, zip(operands, operands[1:])):
                if isinstance(op, (ast.Is, ast.IsNot)):
                    singleton = [x for x in (a, b) if isinstance(x, ast.Constant) and x.value in _SINGLETONS
                                 and type(x.value) in (type(None), bool, type(Ellipsis))]
                    if not singleton:
                        raise _NotOutside("`is` against something other than None/True/False")
            values = [self.value(x) for x in operands]
            ops = [_COMPARE[type(op)] for op in node.ops]

            def compare(results):
                left = values[0](results)
                for fn, right_eval in zip(ops, values[1:]):
                    right = right_eval(results)
                    if not fn(left, right):
                        return False
                    left = right
                return True
            return compare
        if self.is_const(node) or self.mixes(node):
            return self.value(node)
        return self.probe(node, "truth")

    def add_assert(self, stmt: ast.Assert, label: str | None = None) -> None:
        source = label or "assert " + ast.unparse(self.substituted(stmt.test))
        start = len(self.probes)
        evaluate = self.condition(stmt.test)
        evaluate.probes = list(self.probes[start:])  # type: ignore[attr-defined]
        self.test.checks.append((source, evaluate))

    def add_unittest_call(self, call: ast.Call) -> None:
        """``self.assertX(...)`` as an assertion."""
        name = call.func.attr  # type: ignore[union-attr]
        args, kw = list(call.args), {k.arg: k.value for k in call.keywords if k.arg is not None}
        if any(isinstance(a, ast.Starred) for a in args) or any(k.arg is None for k in call.keywords):
            raise _NotOutside("starred arguments")

        def arg(i, key):
            if i < len(args):
                return args[i]
            if key in kw:
                return kw[key]
            raise _NotOutside(f"{name} without its {key} argument")

        def compare(op, a, b):
            return ast.Compare(left=a, ops=[op], comparators=[b])

        typed = {"assertListEqual": "__alignkit_list_equal", "assertTupleEqual": "__alignkit_tuple_equal",
                 "assertDictEqual": "__alignkit_dict_equal", "assertSetEqual": "__alignkit_set_equal",
                 "assertMultiLineEqual": "__alignkit_str_equal", "assertSequenceEqual": "__alignkit_sequence_equal",
                 "assertCountEqual": "__alignkit_count_equal", "assertItemsEqual": "__alignkit_count_equal"}
        if name in _UNITTEST_BINARY:
            op, first, second = _UNITTEST_BINARY[name]
            test = compare(op(), arg(0, first), arg(1, second))
        elif name in ("assertTrue", "assert_"):
            test = arg(0, "expr")
        elif name == "assertFalse":
            test = ast.UnaryOp(op=ast.Not(), operand=arg(0, "expr"))
        elif name == "assertIsNone":
            test = compare(ast.Is(), arg(0, "obj"), ast.Constant(None))
        elif name == "assertIsNotNone":
            test = compare(ast.IsNot(), arg(0, "obj"), ast.Constant(None))
        elif name in ("assertIsInstance", "assertNotIsInstance"):
            test = ast.Call(func=ast.Name("isinstance", ast.Load()), args=[arg(0, "obj"), arg(1, "cls")], keywords=[])
            if not self.is_const(args[1] if len(args) > 1 else kw["cls"]):
                raise _NotOutside("isinstance against a class that is not a built-in type")
            if name == "assertNotIsInstance":
                test = ast.UnaryOp(op=ast.Not(), operand=test)
        elif name in ("assertAlmostEqual", "assertAlmostEquals", "assertNotAlmostEqual"):
            fn = "__alignkit_not_almost_equal" if "Not" in name else "__alignkit_almost_equal"
            pos = [arg(0, "first"), arg(1, "second")] + args[2:3]
            keywords = [ast.keyword(arg=k, value=v) for k, v in kw.items() if k in ("places", "delta")]
            test = ast.Call(func=ast.Name(fn, ast.Load()), args=pos, keywords=keywords)
        elif name in typed:
            keywords = [ast.keyword(arg=k, value=v) for k, v in kw.items() if k == "seq_type"]
            test = ast.Call(func=ast.Name(typed[name], ast.Load()), args=[arg(0, "first"), arg(1, "second")],
                            keywords=keywords)
        else:
            raise _NotOutside(f"self.{name}")
        self.add_assert(ast.Assert(test=test, msg=None), label=ast.unparse(self.substituted(call)))

    def add_setup(self, stmt: ast.stmt) -> None:
        index = len(self.steps)
        self.steps.append(Step("exec", ast.unparse(stmt)))
        self.test.setup.append(index)


class _NotConst(Exception):
    pass


#: unittest assertions that are one comparison: (operator, first keyword, second keyword)
_UNITTEST_BINARY = {
    "assertEqual": (ast.Eq, "first", "second"), "assertEquals": (ast.Eq, "first", "second"),
    "assertNotEqual": (ast.NotEq, "first", "second"), "assertIn": (ast.In, "member", "container"),
    "assertNotIn": (ast.NotIn, "member", "container"), "assertGreater": (ast.Gt, "a", "b"),
    "assertGreaterEqual": (ast.GtE, "a", "b"), "assertLess": (ast.Lt, "a", "b"),
    "assertLessEqual": (ast.LtE, "a", "b"), "assertIs": (ast.Is, "expr1", "expr2"),
    "assertIsNot": (ast.IsNot, "expr1", "expr2"),
}


def _is_main_guard(test: ast.expr) -> bool:
    if not isinstance(test, ast.Compare) or len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    a, b = test.left, test.comparators[0]
    return {type(a), type(b)} == {ast.Name, ast.Constant} and any(
        isinstance(x, ast.Name) and x.id == "__name__" for x in (a, b)) and any(
        isinstance(x, ast.Constant) and x.value == "__main__" for x in (a, b))


class _Program:
    """Walks one test's statements (a snippet or a whole test program)."""

    def __init__(self, tr: _Translator):
        self.tr = tr
        self.checkers: dict[str, ast.FunctionDef] = {}
        self.cases: list[ast.ClassDef] = []
        self.unittest_names: set[str] = set()  # names bound to the unittest module
        self.testcase_names: set[str] = set()  # names bound to unittest.TestCase
        self.main_names: set[str] = set()  # names bound to unittest.main
        self.sys_names: set[str] = set()
        self.exit_names: set[str] = set()
        self.stopped = False

    def run(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if self.stopped:
                return
            self.statement(stmt)

    def statement(self, stmt: ast.stmt) -> None:  # noqa: C901
        tr = self.tr
        if isinstance(stmt, ast.Assert):
            tr.add_assert(stmt)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self.imports(stmt)
        elif isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            pass
        elif isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            try:
                value = tr.const(stmt.value)
            except _NotConst:
                raise _NotOutside("an assignment of something not constant") from None
            for t in stmt.targets:
                tr.constants[t.id] = (value, stmt.value)
                tr.subst.pop(t.id, None)
            if tr.constants_to_child:
                tr.add_setup(stmt)
        elif isinstance(stmt, ast.FunctionDef) and self.is_checker(stmt):
            self.checkers[stmt.name] = stmt
        elif isinstance(stmt, ast.ClassDef) and self.is_case(stmt):
            self.cases.append(stmt)
        elif isinstance(stmt, ast.If) and _is_main_guard(stmt.test) and not stmt.orelse:
            self.run(stmt.body)
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            self.call(stmt.value)
        else:
            raise _NotOutside(f"a {type(stmt).__name__} statement")

    def imports(self, stmt: ast.Import | ast.ImportFrom) -> None:
        tr = self.tr
        tr.imported.update(a.asname or a.name.partition(".")[0] for a in stmt.names)
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                bound = alias.asname or alias.name.partition(".")[0]
                if alias.name == "unittest":
                    self.unittest_names.add(bound)
                elif alias.name == "sys":
                    self.sys_names.add(bound)
                elif alias.name in _IMPORTABLE:
                    tr.names[bound] = _IMPORTABLE[alias.name]
        else:
            module = stmt.module or ""
            for alias in stmt.names:
                bound = alias.asname or alias.name
                if module == "unittest" and alias.name == "TestCase":
                    self.testcase_names.add(bound)
                elif module == "unittest" and alias.name == "main":
                    self.main_names.add(bound)
                elif module == "sys" and alias.name == "exit":
                    self.exit_names.add(bound)
                elif module in _IMPORTABLE and alias.name in _IMPORTABLE[module]:
                    tr.names[bound] = _IMPORTABLE[module][alias.name]
        if not (isinstance(stmt, ast.ImportFrom) and stmt.module in ("unittest", "__future__")) and not (
                isinstance(stmt, ast.Import) and all(a.name == "unittest" for a in stmt.names)):
            tr.add_setup(stmt)  # the sandbox needs the names too (f(math.pi))

    def is_checker(self, fn: ast.FunctionDef) -> bool:
        args = fn.args
        if fn.decorator_list or args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs or args.defaults:
            return False
        if len(args.args) != 1:
            return False
        return all(isinstance(s, (ast.Assert, ast.Pass, ast.Import, ast.ImportFrom)) or (
            isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in fn.body)

    def is_case(self, cls: ast.ClassDef) -> bool:
        if cls.decorator_list or cls.keywords or len(cls.bases) != 1:
            return False
        base = cls.bases[0]
        if not ((isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name)
                 and base.value.id in self.unittest_names and base.attr == "TestCase")
                or (isinstance(base, ast.Name) and base.id in self.testcase_names)):
            return False
        for s in cls.body:
            if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) or isinstance(s, ast.Pass):
                continue
            if not isinstance(s, ast.FunctionDef) or s.decorator_list:
                return False
            if s.name in ("setUp", "tearDown", "setUpClass", "tearDownClass", "run", "__init__"):
                return False
            if s.name.startswith("test"):
                if len(s.args.args) != 1 or s.args.vararg or s.args.kwarg or s.args.kwonlyargs:
                    return False
        return True

    def call(self, call: ast.Call) -> None:
        func = call.func
        if isinstance(func, ast.Name) and func.id in self.checkers and len(call.args) == 1 and not call.keywords:
            checker = self.checkers[func.id]
            param = checker.args.args[0].arg
            saved = dict(self.tr.subst)
            self.tr.subst[param] = call.args[0]
            try:
                self.run(checker.body)
            finally:
                self.tr.subst = saved
            return
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.unittest_names
                and func.attr == "main") or (isinstance(func, ast.Name) and func.id in self.main_names):
            self.run_cases()
            exits = True
            for k in call.keywords:
                if k.arg == "exit":
                    if not isinstance(k.value, ast.Constant):
                        raise _NotOutside("unittest.main(exit=...) not constant")
                    exits = bool(k.value.value)
            self.stopped = exits
            return
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.sys_names
                and func.attr == "exit") or (isinstance(func, ast.Name) and func.id in self.exit_names):
            if call.keywords or len(call.args) > 1:
                raise _NotOutside("sys.exit with several arguments")
            code = None
            if call.args:
                try:
                    code = self.tr.const(call.args[0])
                except _NotConst:
                    raise _NotOutside("sys.exit of something not constant") from None
            if not (code is None or code is False or code == 0):
                self.tr.test.fail_now = ("SystemExit", f"exit status {code!r}")
            self.stopped = True
            return
        raise _NotOutside("a call statement")

    def run_cases(self) -> None:
        for cls in sorted(self.cases, key=lambda c: c.name):
            for method in sorted((s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name.startswith("test")),
                                 key=lambda m: m.name):
                self_name = method.args.args[0].arg
                for s in method.body:
                    if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) or isinstance(s, ast.Pass):
                        continue
                    if isinstance(s, ast.Assert):
                        self.tr.add_assert(s)
                        continue
                    if (isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                            and isinstance(s.value.func, ast.Attribute)
                            and isinstance(s.value.func.value, ast.Name) and s.value.func.value.id == self_name):
                        self.tr.add_unittest_call(s.value)
                        continue
                    raise _NotOutside(f"a {type(s).__name__} statement in {cls.name}.{method.name}")


_NOT_JUDGEABLE = ("NotJudgeable", "this test cannot be judged outside the program, and in-process tests "
                  "are not allowed (in_process_tests=False)")


def _plan_one(source: str, label: str, steps: list[Step], constants: dict, names: dict,
              constants_to_child: bool, allow_in_process: bool) -> _Test:
    """One test: judged outside if it can be, else one in-process step."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes
        return _Test(label=label, outside=True, fail_now=(type(e).__name__, str(e)[:300]))
    mark, saved_constants, saved_names = len(steps), dict(constants), dict(names)
    tr = _Translator(steps, constants, names, constants_to_child)
    tr.test.label = label
    try:
        _Program(tr).run(tree.body)
        return tr.test
    except (_NotOutside, RecursionError):
        del steps[mark:]
        constants.clear()
        constants.update(saved_constants)
        names.clear()
        names.update(saved_names)
        if not allow_in_process:
            return _Test(label=label, outside=False, fail_now=_NOT_JUDGEABLE)
        index = len(steps)
        steps.append(Step("exec", source))
        return _Test(label=label, outside=False, exec_step=index)


def plan_tests(tests: str | Sequence[str], *, allow_in_process: bool = True) -> TestPlan:
    """The steps for a problem's ``tests`` (a test program, or a list of snippets each one test).

    With ``allow_in_process=False`` a test that cannot be judged outside the program fails at once
    (``"NotJudgeable"``) instead of running inside it. Plans are cached (an RL step samples each
    problem several times); a plan is never changed after it is made.
    """
    if isinstance(tests, str):
        return _cached_plan(tests, allow_in_process)
    return _cached_plan(tuple(t if isinstance(t, str) else str(t) for t in tests), allow_in_process)


@functools.lru_cache(maxsize=4096)
def _cached_plan(tests: str | tuple[str, ...], allow_in_process: bool) -> TestPlan:
    text_program = isinstance(tests, str)
    sources = [tests] if text_program else list(tests)
    plan, had_constants = _plan(sources, text_program, False, allow_in_process)
    if had_constants and any(t.exec_step is not None for t in plan.tests):
        # a test runs inside, so constants defined by the tests must exist there too; the tests
        # that use them are then no longer judged on values the program cannot see
        plan, _ = _plan(sources, text_program, True, allow_in_process)
        for t in plan.tests:
            if t.constants_used:
                t.outside = False
    return plan


def _plan(sources: list[str], text_program: bool, constants_to_child: bool,
          allow_in_process: bool) -> tuple[TestPlan, bool]:
    steps: list[Step] = []
    constants: dict = {}
    names: dict = {}
    planned = []
    had_constants = False
    for src in sources:
        planned.append(_plan_one(src, src, steps, constants, names, constants_to_child, allow_in_process))
        had_constants = had_constants or bool(constants)
    return TestPlan(steps=steps, tests=planned, text_program=text_program), had_constants
