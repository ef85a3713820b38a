"""A corpus of malformed inputs for every command, and what alignkit must answer: exit 2 and one line that
names the file, the row and the field (or the argument), nothing written, no traceback.

``python tests/malformed_inputs.py`` runs every case through ``alignkit.cli.main`` and prints the table
(class, command, exit code, seconds, the message); ``tests/test_malformed_inputs.py`` asserts it.
Classes: records (fields a kind needs, their types), JSONL syntax, types, encodings, sizes, and the
arguments of ``train``, ``verify``, ``flips``, ``evaluate`` and ``rollout``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "dpo_tiny.yaml")


@dataclass
class Case:
    name: str                         # the class of malformed input
    group: str                        # records, JSONL syntax, types, encodings, sizes, arguments
    command: str                      # train, verify, flips, evaluate, rollout
    files: dict = field(default_factory=dict)   # name -> str | bytes | list of rows (JSONL)
    args: list = field(default_factory=list)    # appended to the command's base arguments
    expect: tuple = ()                # every one must appear in the error line
    code: int = 2
    base: bool = True                 # False: args are the whole command line after the command


def _rows(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


PAIR = {"prompt": "Start with 3. Add 4. What is the result?", "chosen": "7", "rejected": "8"}
PROBLEM = {"prompt": "Start with 3. Add 4. What is the result?", "answer": "7", "solution": "3 + 4 = 7"}
ROLLOUT = {**PROBLEM, "completions": [{"text": "The answer is 7.", "finish_reason": "stop"},
                                      {"text": "The answer is 8.", "finish_reason": "stop"}]}
FLIP = {"id": "q1", "reference": "7", "old": "7", "new": "8"}
SCORE_FLIP = {"id": "q1", "reference": "7", "old_score": 0.9, "new_score": 0.2}
BIG = 10_000_000  # a 10 MB prompt

TRAIN = "data.jsonl"
VERIFY_IN = "rollouts.jsonl"
FLIPS_IN = "flips.jsonl"

# the output each command would write: it must not exist after a refused input
OUTPUTS = {
    "train": ["out/model.safetensors", "out/adapter_model.safetensors"],
    "verify": ["verified.jsonl", "pairs.jsonl", "negatives.jsonl"],
    "flips": ["report/flips.json"],
    "evaluate": ["preds.jsonl"],
    "rollout": ["rollouts_out.jsonl"],
}


def base_args(command: str, tmp: Path, model: str) -> list[str]:
    if command == "train":
        return ["train", RECIPE, "--model_name_or_path", model, "--train_data", str(tmp / TRAIN),
                "--eval_strategy", "no", "--save_strategy", "no", "--max_steps", "1", "--report_to", "none",
                "--output_dir", str(tmp / "out")]
    if command == "verify":
        return ["verify", "--verifier", "math", "--input", str(tmp / VERIFY_IN), "--out", str(tmp / "verified.jsonl"),
                "--pairs", str(tmp / "pairs.jsonl"), "--negatives", str(tmp / "negatives.jsonl"), "--num_workers", "1"]
    if command == "flips":
        return ["flips", "--predictions", str(tmp / FLIPS_IN), "--out", str(tmp / "report"), "--bootstrap", "0",
                "--no_plot"]
    if command == "evaluate":
        return ["evaluate", "--model", model, "--suite", str(tmp / "suite.yaml"), "--out", str(tmp / "preds.jsonl")]
    if command == "rollout":
        return ["rollout", "--model", model, "--prompts", str(tmp / "prompts.jsonl"), "--out",
                str(tmp / "rollouts_out.jsonl"), "-n", "2", "--max_new_tokens", "4"]
    raise ValueError(command)


def _deep(depth: int) -> str:
    return '{"prompt": "p", "chosen": "c", "rejected": ' + "[" * depth + "]" * depth + "}"


CASES: list[Case] = [
    # ---------------------------------------------------------------- train: records
    Case("field missing (rejected)", "records", "train", {TRAIN: _rows(PAIR, {k: PAIR[k] for k in ("prompt", "chosen")})},
         expect=(f"{TRAIN}, row 2, field 'rejected'", "missing required field")),
    Case("field null (chosen)", "records", "train", {TRAIN: _rows(PAIR, {**PAIR, "chosen": None})},
         expect=("row 2, field 'chosen'", "null")),
    Case("response blank", "records", "train", {TRAIN: _rows(PAIR, {**PAIR, "rejected": "   "})},
         expect=("row 2, field 'rejected'", "empty response")),
    Case("prompt blank", "records", "train", {TRAIN: _rows({**PAIR, "prompt": ""})},
         expect=("row 1, field 'prompt'", "empty prompt")),
    Case("chat role unknown", "records", "train",
         {TRAIN: _rows({**PAIR, "prompt": [{"role": "robot", "content": "hi"}]})},
         expect=("row 1, field 'prompt[0].role'", "'robot'")),
    Case("chat content missing", "records", "train", {TRAIN: _rows({**PAIR, "prompt": [{"role": "user"}]})},
         expect=("row 1, field 'prompt[0].content'", "missing 'content'")),
    Case("chat prompt empty list", "records", "train", {TRAIN: _rows({**PAIR, "prompt": []})},
         expect=("row 1, field 'prompt'", "no messages")),
    Case("response as user message", "records", "train",
         {TRAIN: _rows({**PAIR, "chosen": [{"role": "user", "content": "7"}]})},
         expect=("row 1, field 'chosen[0].role'", "not one of assistant")),
    Case("sft record lacks response", "records", "train", {TRAIN: _rows({"prompt": "p"})},
         args=["--method_override_placeholder"], expect=()),  # replaced below (sft recipe)
    Case("negatives: samples empty list", "records", "train", {TRAIN: _rows({**PAIR, "samples": []})},
         expect=()),  # replaced below (d2o recipe)
    # ---------------------------------------------------------------- train: JSONL syntax
    Case("invalid JSON (trailing comma)", "JSONL syntax", "train", {TRAIN: _rows(PAIR, '{"prompt": "a", "chosen": "b",}')},
         expect=("row 2", "invalid JSON")),
    Case("truncated last line", "JSONL syntax", "train", {TRAIN: _rows(PAIR) + '{"prompt": "a", "chosen": "b", "rej'},
         expect=("row 2", "invalid JSON")),
    Case("row is a list, not an object", "JSONL syntax", "train", {TRAIN: _rows(PAIR, ["a", "b"])},
         expect=("row 2", "expected a record", "got list")),
    Case("pretty-printed JSON object", "JSONL syntax", "train", {TRAIN: json.dumps(PAIR, indent=2)},
         expect=(TRAIN, "one JSON object spread over lines")),
    Case("empty file", "JSONL syntax", "train", {TRAIN: ""}, expect=(TRAIN, "no records")),
    Case("only blank lines", "JSONL syntax", "train", {TRAIN: "\n\n  \n"}, expect=(TRAIN, "no records")),
    Case("JSON nested 100,000 deep", "JSONL syntax", "train", {TRAIN: _deep(100_000) + "\n"},
         expect=("row 1", "nested more than 100 levels")),
    Case("JSON nested 500 deep (parses)", "JSONL syntax", "train", {TRAIN: _deep(500) + "\n"},
         expect=("row 1, field 'rejected'", "nested more than 100 levels")),
    Case("NaN literal in a response", "JSONL syntax", "train", {TRAIN: '{"prompt": "p", "chosen": NaN, "rejected": "r"}\n'},
         expect=("row 1, field 'chosen'", "expected str")),
    # ---------------------------------------------------------------- train: types
    Case("response is a number", "types", "train", {TRAIN: _rows({**PAIR, "rejected": 8})},
         expect=("row 1, field 'rejected'", "got int")),
    Case("prompt is an object", "types", "train", {TRAIN: _rows({**PAIR, "prompt": {"text": "p"}})},
         expect=("row 1, field 'prompt'", "got dict")),
    Case("column mixes text and chat", "types", "train",
         {TRAIN: _rows(PAIR, {**PAIR, "prompt": [{"role": "user", "content": "hi"}]})},
         expect=("row 2, field 'prompt'", "mixes formats")),
    # ---------------------------------------------------------------- train: encodings
    Case("invalid UTF-8 byte", "encodings", "train", {TRAIN: _rows(PAIR).encode() + b'{"prompt": "a\xff", "chosen": "b", "rejected": "c"}\n'},
         expect=("row 2", "not valid UTF-8", "0xff")),
    Case("UTF-16 file", "encodings", "train", {TRAIN: _rows(PAIR).encode("utf-16")},
         expect=(TRAIN, "row 1", "not valid UTF-8")),
    Case("Latin-1 file", "encodings", "train",
         {TRAIN: json.dumps({**PAIR, "prompt": "café au lait?"}, ensure_ascii=False).encode("latin-1") + b"\n"},
         expect=("row 1", "not valid UTF-8", "0xe9")),
    # ---------------------------------------------------------------- train: sizes
    Case("10 MB prompt", "sizes", "train", {TRAIN: _rows({**PAIR, "prompt": "Add 4 to 3. " * (BIG // 12)})},
         expect=("row 1, field 'prompt'", "leaves no room for the response within max_length=256",
                 "refused before tokenizing it whole")),
    # ---------------------------------------------------------------- train: files and arguments
    Case("data file missing", "arguments", "train", {}, expect=(f"no such data file or directory: ",)),
    Case("unsupported file type (.csv)", "arguments", "train", {"data.csv": "prompt,chosen\n"},
         args=["--train_data", "{tmp}/data.csv"], expect=("data.csv", "unsupported file type '.csv'")),
    Case("corrupt Parquet file", "encodings", "train", {"data.parquet": b"PAR1 not really parquet PAR1"},
         args=["--train_data", "{tmp}/data.parquet"], expect=("data.parquet", "not a readable Parquet file")),
    Case("recipe key misspelled", "arguments", "train", {"r.yaml": "method: dpo\nbetta: 0.1\n"},
         args=["{tmp}/r.yaml"], base=False, expect=("r.yaml", "unknown recipe key 'betta'", "did you mean 'beta'?")),
    Case("recipe not a mapping", "arguments", "train", {"r.yaml": "- method: dpo\n"},
         args=["{tmp}/r.yaml"], base=False, expect=("r.yaml", "must be a mapping")),
    Case("recipe not YAML", "arguments", "train", {"r.yaml": "method: [dpo\n"},
         args=["{tmp}/r.yaml"], base=False, expect=("r.yaml: not valid YAML", "line 2")),
    Case("recipe missing", "arguments", "train", {}, args=["{tmp}/nope.yaml"], base=False, expect=("nope.yaml",)),
    Case("unknown method", "arguments", "train", {"r.yaml": "method: ppo\n"}, args=["{tmp}/r.yaml"], base=False,
         expect=("unknown method 'ppo'",)),
    Case("value of the wrong type (--beta abc)", "arguments", "train", {TRAIN: _rows(PAIR)}, args=["--beta", "abc"],
         expect=("--beta", "abc")),
    Case("value out of choices (score_layout)", "arguments", "train", {TRAIN: _rows(PAIR)},
         args=["--score_layout", "diagonal"], expect=("score_layout must be one of",)),
    Case("max_length too small for any prompt", "arguments", "train", {TRAIN: _rows(PAIR)}, args=["--max_length", "2"],
         expect=("row 1, field 'prompt'", "max_length=2")),
    Case("resume from a missing checkpoint", "arguments", "train", {TRAIN: _rows(PAIR)},
         args=["--resume_from_checkpoint", "{tmp}/out/checkpoint-9"], expect=("cannot resume from", "checkpoint-9")),
    # ---------------------------------------------------------------- verify
    Case("problem without its gold answer", "records", "verify",
         {VERIFY_IN: _rows(ROLLOUT, {k: v for k, v in ROLLOUT.items() if k not in ("answer", "solution")})},
         expect=(f"{VERIFY_IN}, row 2, field 'answer'", "missing field", "gold answer")),
    Case("answer holding an object", "types", "verify", {VERIFY_IN: _rows({**ROLLOUT, "answer": {"value": 7}})},
         expect=("row 1, field 'answer'", "got dict")),
    Case("answer NaN", "types", "verify", {VERIFY_IN: '{"prompt": "p", "answer": NaN, "completions": [{"text": "7"}]}\n'},
         expect=("row 1, field 'answer'", "NaN")),
    Case("answer Infinity", "types", "verify",
         {VERIFY_IN: '{"prompt": "p", "answer": Infinity, "completions": [{"text": "7"}]}\n'},
         expect=("row 1, field 'answer'", "Infinity")),
    Case("answer blank", "records", "verify", {VERIFY_IN: _rows({**ROLLOUT, "answer": " "})},
         expect=("row 1, field 'answer'", "empty answer")),
    Case("empty input file", "JSONL syntax", "verify", {VERIFY_IN: ""}, expect=(VERIFY_IN, "no rows")),
    Case("completions missing", "records", "verify", {VERIFY_IN: _rows(PROBLEM)},
         expect=("row 1, field 'completions'",)),
    Case("completion text not a string", "types", "verify",
         {VERIFY_IN: _rows({**PROBLEM, "completions": [{"text": 7}]})},
         expect=("row 1, field 'completions[0].text'",)),
    Case("match verifier without answer (solution only)", "records", "verify",
         {VERIFY_IN: _rows({k: v for k, v in ROLLOUT.items() if k != "answer"})}, args=["--verifier", "match"],
         expect=("row 1, field 'answer'", "match verifier")),
    Case("code verifier without tests or answer", "records", "verify",
         {VERIFY_IN: _rows({k: v for k, v in ROLLOUT.items() if k not in ("answer", "solution")})},
         args=["--verifier", "code", "--verifier_option", "isolation=none"], expect=("row 1, field 'tests'",)),
    Case("tests holding a number", "types", "verify", {VERIFY_IN: _rows({**ROLLOUT, "tests": 5})},
         args=["--verifier", "code", "--verifier_option", "isolation=none"], expect=("row 1, field 'tests'", "got int")),
    Case("invalid UTF-8 in rollouts", "encodings", "verify", {VERIFY_IN: b'{"prompt": "p\xc3", "answer": "7"}\n'},
         expect=("row 1", "not valid UTF-8")),
    Case("unknown verifier", "arguments", "verify", {VERIFY_IN: _rows(ROLLOUT)}, args=["--verifier", "chess"],
         expect=("unknown verifier 'chess'",)),
    Case("verifier option it does not take", "arguments", "verify", {VERIFY_IN: _rows(ROLLOUT)},
         args=["--verifier_option", "colour=1"], expect=("verifier 'math'", "colour")),
    Case("verifier option without '='", "arguments", "verify", {VERIFY_IN: _rows(ROLLOUT)},
         args=["--verifier_option", "precision"], expect=("precision",)),
    Case("--pairs_per_prompt 0", "arguments", "verify", {VERIFY_IN: _rows(ROLLOUT)}, args=["--pairs_per_prompt", "0"],
         expect=("--pairs_per_prompt",)),
    Case("--timeout -1", "arguments", "verify", {VERIFY_IN: _rows(ROLLOUT)}, args=["--timeout", "-1"],
         expect=("--timeout",)),
    Case("input file missing", "arguments", "verify", {}, expect=(VERIFY_IN,)),
    Case("--out into a missing directory's file position", "arguments", "verify",
         {VERIFY_IN: _rows(ROLLOUT), "afile": "x"}, args=["--out", "{tmp}/afile/verified.jsonl"], expect=("afile",)),
    # ---------------------------------------------------------------- flips
    Case("old_score Infinity", "types", "flips", {FLIPS_IN: _rows(SCORE_FLIP, '{"id": "q2", "reference": "7", "old_score": Infinity, "new_score": 0.1}')},
         expect=(f"{FLIPS_IN}, row 2, field 'old_score'", "Infinity")),
    Case("new_score 1e999", "types", "flips", {FLIPS_IN: _rows(SCORE_FLIP, '{"id": "q2", "reference": "7", "old_score": 0.5, "new_score": 1e999}')},
         expect=("row 2, field 'new_score'", "Infinity")),
    Case("old_score NaN", "types", "flips", {FLIPS_IN: _rows(SCORE_FLIP, '{"id": "q2", "reference": "7", "old_score": NaN, "new_score": 0.1}')},
         expect=("row 2, field 'old_score'", "NaN")),
    Case("scores of 1e308 (their difference overflows)", "sizes", "flips",
         {FLIPS_IN: _rows(SCORE_FLIP, {**SCORE_FLIP, "id": "q2", "old_score": 1e308, "new_score": -1e308})},
         expect=("row 2, field 'old_score'", "beyond")),
    Case("score as text", "types", "flips", {FLIPS_IN: _rows(SCORE_FLIP, {**SCORE_FLIP, "id": "q2", "new_score": "high"})},
         expect=("row 2, field 'new_score'", "expected a number")),
    Case("invalid UTF-8 (pyarrow fast path)", "encodings", "flips",
         {FLIPS_IN: _rows(FLIP).encode() + b'{"id": "q2", "reference": "\xff\xfe", "old": "7", "new": "8"}\n'},
         expect=("row 2", "not valid UTF-8", "0xff")),
    Case("duplicate id", "records", "flips", {FLIPS_IN: _rows(FLIP, FLIP)}, expect=("row 2, field 'id'", "duplicate id 'q1'")),
    Case("reference missing", "records", "flips", {FLIPS_IN: _rows(FLIP, {k: v for k, v in FLIP.items() if k != "reference"} | {"id": "q2"})},
         expect=("row 2, field 'reference'",)),
    Case("id a float", "types", "flips", {FLIPS_IN: _rows({**FLIP, "id": 2.5})}, expect=("row 1, field 'id'",)),
    Case("empty flips file", "JSONL syntax", "flips", {FLIPS_IN: ""}, expect=(FLIPS_IN, "no records")),
    Case("ids of --new not in --old", "records", "flips",
         {"old.jsonl": _rows({"id": "a", "reference": "7", "prediction": "7"}),
          "new.jsonl": _rows({"id": "b", "reference": "7", "prediction": "7"})},
         args=["--old", "{tmp}/old.jsonl", "--new", "{tmp}/new.jsonl", "--out", "{tmp}/report"], base=False,
         expect=("old.jsonl, row 1, field 'id'", "id 'a' is not in", "new.jsonl")),
    Case("unknown verifier (flips)", "arguments", "flips", {FLIPS_IN: _rows(FLIP)}, args=["--verifier", "chess"],
         expect=("unknown verifier 'chess'",)),
    Case("--confidence 1.5", "arguments", "flips", {FLIPS_IN: _rows(FLIP)}, args=["--confidence", "1.5"],
         expect=("--confidence",)),
    Case("no input given", "arguments", "flips", {}, args=["--out", "{tmp}/report"], base=False,
         expect=("give exactly one of",)),
    # ---------------------------------------------------------------- evaluate
    Case("suite file missing", "arguments", "evaluate", {}, expect=("no such suite file",)),
    Case("suite key misspelled", "arguments", "evaluate", {"suite.yaml": "data: synthetic:arithmetic_problems\nverfier: math\n"},
         expect=("suite.yaml, key 'verfier'", "unknown key")),
    Case("suite data without gold answers", "records", "evaluate",
         {"suite.yaml": "data: problems.jsonl\n", "problems.jsonl": _rows({"prompt": "p"})},
         expect=("problems.jsonl, row 1", "answer")),
    Case("suite generation n = 0", "arguments", "evaluate",
         {"suite.yaml": "data: synthetic:arithmetic_problems\ngeneration:\n  n: 0\n"}, expect=("suite.yaml", "generation.n")),
    # ---------------------------------------------------------------- rollout
    Case("prompt field missing", "records", "rollout", {"prompts.jsonl": _rows({"question": "p"})},
         expect=("prompts.jsonl, row 1, field 'prompt'", "missing")),
    Case("empty prompts file", "JSONL syntax", "rollout", {"prompts.jsonl": ""}, expect=("prompts.jsonl", "no rows")),
    Case("-n 0", "arguments", "rollout", {"prompts.jsonl": _rows(PROBLEM)}, args=["-n", "0"], expect=("-n",)),
    Case("--temperature -1", "arguments", "rollout", {"prompts.jsonl": _rows(PROBLEM)}, args=["--temperature", "-1"],
         expect=("--temperature",)),
    Case("--max_new_tokens 0", "arguments", "rollout", {"prompts.jsonl": _rows(PROBLEM)}, args=["--max_new_tokens", "0"],
         expect=("--max_new_tokens",)),
    Case("10 MB prompt to sample from", "sizes", "rollout", {"prompts.jsonl": _rows({"prompt": "Add 4 to 3. " * (BIG // 12)})},
         expect=("prompts.jsonl, row 1, field 'prompt'", "context")),
]

# cases that need another recipe
for case in CASES:
    if case.name == "sft record lacks response":
        case.files = {TRAIN: _rows({"prompt": "p", "response": "r"}, {"prompt": "p"}),
                      "sft.yaml": f"method: sft\nmax_length: 128\nuse_cpu: true\n"}
        case.args, case.base, case.expect = ["SFT"], True, ("row 2, field 'response'", "missing required field")
    if case.name == "negatives: samples empty list":
        case.files = {TRAIN: _rows({"prompt": "p", "rejected": "r", "samples": []}),
                      "d2o.yaml": "method: d2o\nmax_length: 128\nuse_cpu: true\n"}
        case.args, case.base, case.expect = ["D2O"], True, ("row 1, field 'samples'", "empty list of samples")


def argv_of(case: Case, tmp: Path, model: str) -> list[str]:
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if not case.base:
        return [case.command, *args]
    argv = base_args(case.command, tmp, model)
    if args[:1] in (["SFT"], ["D2O"]):  # the same arguments on another method's recipe
        argv[1] = str(tmp / ("sft.yaml" if args[0] == "SFT" else "d2o.yaml"))
        args = args[1:]
    return argv + args


@dataclass
class Result:
    code: int
    line: str          # the last line on stderr
    stderr: str
    written: list      # outputs that exist after the run
    seconds: float


def run_case(case: Case, tmp: Path, model: str) -> Result:
    from alignkit.cli import main

    tmp.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    if case.name == "suite data without gold answers":
        (tmp / "suite.yaml").write_text(f"data: {tmp / 'problems.jsonl'}\n")
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv_of(case, tmp, model))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:  # noqa: BLE001 - a crash is a result here
            traceback.print_exc()
            code = -1
    seconds = time.perf_counter() - start
    text = err.getvalue()
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("[alignkit]")]
    written = [o for o in OUTPUTS[case.command] if (tmp / o).exists()]
    return Result(code, lines[-1] if lines else "", text, written, seconds)


def main() -> None:
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from alignkit.modeling import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="alignkit-malformed-"))
    model = str(make_tiny_model(root / "model", "qwen2"))
    print("| # | class | group | command | exit | s | message |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    named = 0
    for i, case in enumerate(CASES, 1):
        r = run_case(case, root / f"case{i}", model)
        ok = r.code == case.code and all(e in r.line for e in case.expect) and not r.written and "Traceback" not in r.stderr
        named += ok
        line = r.line.replace("|", "\\|").replace(str(root / f"case{i}") + "/", "")
        print(f"| {i} | {case.name} | {case.group} | {case.command} | {r.code} | {r.seconds:.1f} | {line[:400]} |"
              + ("" if ok else " **NOT NAMED**"), flush=True)
    print(f"\n{named}/{len(CASES)} named errors", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
