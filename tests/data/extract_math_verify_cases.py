"""Regenerate ``math_verify_cases.json`` from a checkout of huggingface/Math-Verify's ``tests/``.

    python tests/data/extract_math_verify_cases.py PATH/TO/Math-Verify/tests [COMMIT] > tests/data/math_verify_cases.json

Every parametrized case of the six regression-test files is recorded with the options its test
passes: the test's own ``compare_strings`` helper is replaced by a recorder, and each test function
is called with its ``pytest.mark.parametrize`` values (the recorder compares equal to anything and
keeps what the test compared it with: the expected verdict). ``test_yujianll.py`` calls
``verify(parse(gold), parse(pred))`` directly, so its cases are read from its parameters and get
math-verify's default ``parse`` (``extraction="default"``).

Math-Verify is Apache-2.0 (Copyright The HuggingFace Team); the cases are its test data.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

FILES = ["test_all", "test_boxed", "test_numina_cases", "test_open_thoughts", "test_strict", "test_yujianll"]
HELPER_DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}


class _Expected:
    """Stands in for ``compare_strings(...)``'s result and keeps the value the test compares it with."""

    def __init__(self, record: dict):
        self.record = record

    def __eq__(self, other):
        self.record["expected"] = int(other)
        return True

    __hash__ = None


def main(tests_dir: str, commit: str | None = None) -> None:
    tests_dir = Path(tests_dir).resolve()
    sys.path.insert(0, str(tests_dir.parent))
    calls: list[dict] = []

    def recorder(gold, pred, match_types=HELPER_DEFAULTS["match_types"], precision=6, strict=True,
                 allow_set_relation_comp=False):
        record = {"gold": gold, "pred": pred, "extraction": list(match_types), "precision": precision,
                  "strict": strict, "allow_set_relation_comp": allow_set_relation_comp}
        calls.append(record)
        return _Expected(record)

    cases = []
    for name in FILES:
        module = importlib.import_module(f"tests.{name}")
        if hasattr(module, "compare_strings"):
            module.compare_strings = recorder
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            if not fname.startswith("test_") or fn.__module__ != module.__name__:
                continue
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            if name == "test_yujianll":
                argnames = [a.strip() for a in marks[0].args[0].split(",")]
                for i, values in enumerate(marks[0].args[1]):
                    row = dict(zip(argnames, values))
                    cases.append({"file": name, "test": fname, "index": i, "gold": row["gold"], "pred": row["pred"],
                                  "extraction": "default", "precision": 6, "strict": True,
                                  "allow_set_relation_comp": False, "expected": int(row["result"])})
                continue
            params = [{}]
            if marks:
                argnames = [a.strip() for a in marks[0].args[0].split(",")]
                params = [dict(zip(argnames, values)) for values in marks[0].args[1]]
            for i, kwargs in enumerate(params):
                calls.clear()
                fn(**kwargs)
                for call in calls:
                    cases.append({"file": name, "test": fname, "index": i, **call})
    for case in cases:
        case["default_options"] = (
            case["precision"] == 6 and case["strict"] and not case["allow_set_relation_comp"]
        )
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(tests_dir.parent), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    header = {
        "source": "https://github.com/huggingface/Math-Verify tests/ (" + ", ".join(f + ".py" for f in FILES) + ")",
        "commit": commit,
        "license": "Apache-2.0 (Math-Verify's LICENCE), Copyright The HuggingFace Team; the cases are its test data",
        "generated_by": "tests/data/extract_math_verify_cases.py",
        "fields": "gold, pred, expected (1: math-verify must accept pred for gold) and the options the test passes: "
                  "extraction (targets; 'default' = math_verify.parse's default config), precision (float_rounding), "
                  "strict, allow_set_relation_comp; default_options = precision 6, strict, no set-relation comparison",
    }
    out = sys.stdout
    out.write("{\n")
    for key, value in header.items():
        out.write(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},\n")
    out.write(' "cases": [\n')
    out.write(",\n".join("  " + json.dumps(case, ensure_ascii=False) for case in cases))
    out.write("\n ]\n}\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
