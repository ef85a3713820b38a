"""The ``alignkit flips`` and ``alignkit evaluate`` commands.

``alignkit flips``: the negative-flip regression check of a model update, from

* a flips file: ``--predictions P.jsonl``;
* two prediction files: ``--old OLD.jsonl --new NEW.jsonl`` (joined on ``id``);
* or two models: ``--old_model M1 --new_model M2 [--old_adapter A1 --new_adapter A2]`` with
  ``--suite evals/arithmetic.yaml`` (or ``--eval_data SOURCE --verifier NAME``): both models answer the
  suite, their predictions are saved as ``old_predictions.jsonl`` / ``new_predictions.jsonl`` in
  ``--out``, then compared.

It writes ``flips.json``, ``report.md`` and ``flips.png`` into ``--out`` and prints a summary table.
Exit status: 0, or 1 when ``--max-nfr X`` is given and NFR > X (a CI gate), 2 for bad input.

``alignkit evaluate --model M [--adapter A] --suite S --out preds.jsonl``: one model's predictions on
a suite, and its accuracy.

Also runnable as ``python -m alignkit.evaluation.flips_cli [flips] ...`` or ``... evaluate ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _options(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    from alignkit.verifiers.base import parse_verifier_options

    try:
        return parse_verifier_options(items)
    except ValueError as e:
        parser.error(str(e))


def _add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("suite (model mode)")
    g.add_argument("--suite", help="an eval suite YAML (evals/arithmetic.yaml, evals/gsm8k.yaml, evals/champ.yaml)")
    g.add_argument("--eval_data", help="problems source instead of (or overriding) the suite's data: "
                   "synthetic:arithmetic_problems, gsm8k:<path or hub id>, champ, a problems JSONL")
    g.add_argument("--limit", type=int, help="only the first N items")
    g.add_argument("--max_new_tokens", type=int, help="override the suite's generation.max_new_tokens")
    g.add_argument("--batch_size", type=int, help="override the suite's generation.batch_size")
    g.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")


def _add_verifier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verifier", help="verifier name (prediction files: default match, normalized mode; "
                        "models: the suite's, default math)")
    parser.add_argument("--verifier_option", action="append", default=[], metavar="KEY=VALUE",
                        help="a verifier setting, e.g. mode=exact (repeatable; values parsed as JSON when they can be)")
    parser.add_argument("--num_workers", type=int, help="verifier processes (default: CPU count)")


def _suite(parser, a, options: dict):
    """The suite of the arguments: --suite, overridden by --eval_data / --verifier / --limit / ..."""
    from alignkit.evaluation.suites import load_suite, suite_from_dict

    if a.suite:
        suite = load_suite(a.suite)
    elif a.eval_data:
        suite = suite_from_dict({"name": "eval_data", "data": a.eval_data})
    else:
        parser.error("model mode needs --suite or --eval_data")
    if a.suite and a.eval_data:
        suite.data = a.eval_data
    if a.verifier:
        from alignkit.cli_errors import check_verifier_name

        check_verifier_name(a.verifier)
        suite.verifier = a.verifier
        suite.verifier_options = {}
    suite.verifier_options.update(options)
    if a.limit is not None:
        suite.limit = a.limit
    if a.max_new_tokens is not None:
        suite.generation.max_new_tokens = a.max_new_tokens
    if a.batch_size is not None:
        suite.generation.batch_size = a.batch_size
    return suite


def _predict(suite, name: str, adapter: str | None, dtype: str, problems, num_workers) -> list[dict]:
    from alignkit.evaluation.suites import run_suite

    from alignkit.modeling import load_for_generation

    model, tokenizer = load_for_generation(name, adapter, dtype)
    return run_suite(suite, model, tokenizer, problems=problems, num_workers=num_workers)


# ------------------------------------------------------------------------------------ flips


def flips_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit flips",
        description="Negative flips of a model update (MUSCLE): items the old model got right and the new one "
        "gets wrong. Writes flips.json, report.md and flips.png.",
    )
    g = parser.add_argument_group("inputs (one of)")
    g.add_argument("--predictions", help="flips JSONL: id, reference, old/new and/or old_score/new_score")
    g.add_argument("--old", help="old model's predictions JSONL (id, reference, prediction/correct/score)")
    g.add_argument("--new", help="new model's predictions JSONL, joined with --old on id")
    g.add_argument("--old_model", help="old model: path, hub id or tiny:qwen2 (with --suite or --eval_data)")
    g.add_argument("--new_model", help="new model")
    g.add_argument("--old_adapter", help="a LoRA adapter on the old model")
    g.add_argument("--new_adapter", help="a LoRA adapter on the new model")
    _add_suite_arguments(parser)
    _add_verifier_arguments(parser)
    r = parser.add_argument_group("report")
    r.add_argument("--out", default="flips_report", help="output directory (default: flips_report)")
    r.add_argument("--threshold", type=float, default=0.0, help="score flips: |new - old| must exceed this")
    r.add_argument("--max-nfr", "--max_nfr", dest="max_nfr", type=float,
                   help="exit with status 1 when NFR is above this (a regression gate)")
    r.add_argument("--nfr_basis", default="auto", choices=["auto", "discrete", "scores"],
                   help="which NFR is the headline and is gated by --max-nfr: per-item correctness, score flips, "
                   "or auto (correctness when there is any, else scores)")
    r.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    r.add_argument("--confidence", type=float, default=0.95)
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--show", type=int, default=50, help="flipped items listed in report.md")
    r.add_argument("--no_plot", action="store_true", help="skip flips.png")
    r.add_argument("--old_name", help="what the report calls the old model (default: its path or file name)")
    r.add_argument("--new_name", help="what the report calls the new model")
    r.add_argument("--flip_guard", metavar="PATH",
                   help="a training run's flip_guard.json (or its output_dir): NFR and accuracy over the training "
                        "steps added to report.md, drawn in flip_guard.png")
    return parser


def _mode(parser, a) -> str:
    given = {
        "predictions": a.predictions is not None,
        "files": a.old is not None or a.new is not None,
        "models": a.old_model is not None or a.new_model is not None,
    }
    chosen = [k for k, v in given.items() if v]
    if len(chosen) != 1:
        parser.error("give exactly one of --predictions, --old/--new, or --old_model/--new_model")
    mode = chosen[0]
    if mode == "files" and not (a.old and a.new):
        parser.error("--old and --new go together")
    if mode == "models" and not (a.old_model and a.new_model):
        parser.error("--old_model and --new_model go together")
    if mode != "models" and (a.suite or a.eval_data or a.old_adapter or a.new_adapter):
        parser.error("--suite, --eval_data and the adapters are for --old_model/--new_model")
    if a.bootstrap < 0 or a.show < 0 or a.threshold < 0:
        parser.error("--bootstrap, --show and --threshold must be >= 0")
    if not 0 < a.confidence < 1:
        parser.error("--confidence must be in (0, 1)")
    return mode


def run_flips(a, parser: argparse.ArgumentParser | None = None) -> int:
    """``alignkit flips`` on parsed arguments (see :func:`flips_parser`)."""
    import time

    from alignkit.evaluation.flip_report import (
        compute_report,
        format_summary,
        judge,
        read_flips_file,
        read_predictions,
        write_report,
    )

    parser = parser or flips_parser()
    mode = _mode(parser, a)
    options = _options(parser, a.verifier_option)
    out = Path(a.out)
    verifier = a.verifier or "match"
    if a.verifier:
        from alignkit.cli_errors import check_verifier_name

        check_verifier_name(a.verifier)
    settings: dict = {}
    if mode == "models":
        from alignkit.evaluation.suites import suite_problems
        from alignkit.negatives import write_jsonl

        suite = _suite(parser, a, options)
        verifier, options = suite.verifier, dict(suite.verifier_options)
        problems = suite_problems(suite)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for side, name, adapter in (("old", a.old_model, a.old_adapter), ("new", a.new_model, a.new_adapter)):
            print(f"[{side}] {name}" + (f" + {adapter}" if adapter else "") + f" on {suite.name} ({len(problems)} items)",
                  file=sys.stderr)
            rows = _predict(suite, name, adapter, a.dtype, problems, a.num_workers)
            paths[side] = write_jsonl(rows, out / f"{side}_predictions.jsonl")
        settings = {"suite": suite.path or suite.name, "data": suite.data, "old_model": a.old_model,
                    "new_model": a.new_model, "old_adapter": a.old_adapter, "new_adapter": a.new_adapter,
                    "generation": dataclasses.asdict(suite.generation)}
        a.old, a.new = str(paths["old"]), str(paths["new"])
        mode = "files"
    start = time.perf_counter()
    data = read_flips_file(a.predictions) if mode == "predictions" else read_predictions(a.old, a.new)
    data = judge(data, verifier, options, num_workers=a.num_workers)
    if a.verifier and mode != "models" and "verifier" not in data.correctness:
        use = ("it only decides whether a wrong answer changed (NFR_mc)" if data.changed is not None
               else "nothing was judged")
        print(f"alignkit flips: note: --verifier {a.verifier} did not judge correctness: every row of both files "
              f"carries 'correct' (or a score), which is used as given; {use}. Drop 'correct' from the files to "
              "re-judge the predictions.", file=sys.stderr)
    report = compute_report(
        data, threshold=a.threshold, bootstrap=a.bootstrap, confidence=a.confidence, seed=a.seed, nfr_basis=a.nfr_basis,
        settings={"verifier": verifier, "verifier_options": options, "show": a.show, "max_nfr": a.max_nfr,
                  **({"old_name": a.old_name} if a.old_name else {}), **({"new_name": a.new_name} if a.new_name else {}),
                  **settings},
    )
    paths = write_report(report, out, show=a.show, plot=not a.no_plot, flip_guard=a.flip_guard)
    seconds = time.perf_counter() - start
    print(format_summary(report))
    print(f"-> {', '.join(str(p) for p in paths.values())} ({seconds:.2f}s)")
    gate = report.summary.get("gate")
    if gate is not None and not gate["passed"]:
        print(
            f"alignkit flips: FAILED: NFR {report.nfr:.4f} ({gate['basis']}) is above --max-nfr {a.max_nfr:g}: "
            f"{gate['regressed']:,} of {gate['items']:,} items regressed (their ids are in {paths['json']})",
            file=sys.stderr,
        )
        return 1
    if gate is not None:
        print(f"NFR {report.nfr:.4f} <= --max-nfr {a.max_nfr:g}: passed")
    return 0


def _guarded(command: str, fn, argv) -> int:
    """Run a command; bad input (a malformed row, a missing file, a bad suite) is one clear line, status 2."""
    from alignkit.data.records import RecordError
    from alignkit.evaluation.flip_report import FlipInputError
    from alignkit.evaluation.suites import SuiteError

    try:
        return fn(argv)
    except (RecordError, SuiteError, FlipInputError, FileNotFoundError, ValueError) as e:
        from alignkit.cli_errors import is_input_error

        if isinstance(e, ValueError) and not isinstance(e, (RecordError, SuiteError, FlipInputError)) \
                and not is_input_error(e):
            raise
        print(f"alignkit {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def flips_main(argv: list[str]) -> int:
    """``alignkit flips [...]``: 0 passed, 1 NFR above ``--max-nfr``, 2 bad input."""
    parser = flips_parser()

    def go(args):
        return run_flips(parser.parse_args(args), parser)

    return _guarded("flips", go, list(argv))


# ------------------------------------------------------------------------------------ evaluate


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit evaluate", description="One model's predictions on an eval suite.")
    parser.add_argument("--model", required=True, help="path, hub id or tiny:qwen2")
    parser.add_argument("--adapter", help="a LoRA adapter directory")
    parser.add_argument("--out", required=True, help="predictions JSONL (id, reference, prediction, correct, score)")
    _add_suite_arguments(parser)
    _add_verifier_arguments(parser)
    return parser


def evaluate_main(argv: list[str]) -> int:
    """``alignkit evaluate --model M [--adapter A] --suite S --out preds.jsonl``: writes predictions,
    prints accuracy."""
    parser = evaluate_parser()

    def go(args):
        import time

        from alignkit.evaluation.suites import accuracy, suite_problems
        from alignkit.negatives import write_jsonl

        a = parser.parse_args(args)
        suite = _suite(parser, a, _options(parser, a.verifier_option))
        problems = suite_problems(suite)
        start = time.perf_counter()
        rows = _predict(suite, a.model, a.adapter, a.dtype, problems, a.num_workers)
        seconds = time.perf_counter() - start
        write_jsonl(rows, a.out)
        correct = sum(r["correct"] for r in rows)
        print(f"{suite.name}: accuracy {accuracy(rows):.4f} ({correct}/{len(rows)}) in {seconds:.1f}s -> {a.out}")
        return 0

    return _guarded("evaluate", go, list(argv))


COMMANDS = {"flips": flips_main, "evaluate": evaluate_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["flips", *argv]  # python -m alignkit.evaluation.flips_cli --old A --new B
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m alignkit.evaluation.flips_cli [flips|evaluate] [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.WARNING, format="[alignkit] %(message)s")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
