"""``alignkit`` command line.

    alignkit train RECIPE.yaml [--key value ...]     train with a recipe (also: accelerate launch -m alignkit train ...)
    alignkit train METHOD [--key value ...]          ... with the method's defaults; alignkit train [METHOD] --help
    alignkit rollout --model M --prompts P.jsonl -n 8 --out R.jsonl    sample n completions per prompt
    alignkit verify --verifier math --input R.jsonl --out V.jsonl      label completions, print a summary
    alignkit serve --model M [--enable_lora]         start a vLLM OpenAI-compatible server (GPU)
    alignkit evaluate --model M --suite evals/arithmetic.yaml --out preds.jsonl      one model's predictions
    alignkit flips --old O.jsonl --new N.jsonl [--max-nfr 0.02]    negative-flip report of a model update
    alignkit flips --old_model M1 --new_model M2 --suite S.yaml    ... generating both models' predictions
    alignkit unlearning-eval --model M --data DIR --out R.json       TOFU metrics (open-unlearning's definitions)
    alignkit quickstart [--output_dir DIR] [--tiny]  offline end-to-end demo on SmolLM2 (or a tiny model)
    alignkit tiny-model PATH [--arch qwen2|llama]    build a tiny offline model + tokenizer
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from alignkit.cli_errors import (  # noqa: F401 - the exit codes and checks, also alignkit.cli's API
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_GATE_FAILED,
    UsageError,
    check_verifier_name,
    is_input_error,
)

TRAIN_USAGE = "usage: alignkit train RECIPE.yaml|METHOD [--key value ...]   (alignkit train [METHOD] --help: the keys)"


def _train(argv: list[str]) -> int:
    from alignkit.recipes import METHODS

    help_asked = any(a in ("-h", "--help") for a in argv)
    target = argv[0] if argv and not argv[0].startswith("-") else None
    if help_asked:
        print(train_help(_recipe_method(target) if target else None))
        return 0
    if target is None:
        raise UsageError(f"a recipe file or a method ({', '.join(METHODS)}) comes first; {TRAIN_USAGE}")
    from alignkit.output_dir import locked_output_dir
    from alignkit.recipes import parse_recipe, run_recipe

    import yaml

    as_method = target in METHODS and not Path(target).exists()
    if not as_method and not Path(target).exists():
        from alignkit.did_you_mean import did_you_mean

        hint = did_you_mean(target, METHODS)
        raise UsageError(f"no recipe file {target!r}" + (hint.replace("did you mean", "did you mean the method") if hint
                                                          else f" (a recipe file, or a method: {', '.join(METHODS)})"))
    try:
        recipe = parse_recipe(None, argv[1:], method=target) if as_method else parse_recipe(target, argv[1:])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{target}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    method, config, model_args, data_args, rollout_args, *_ = recipe
    check_model_source(model_args.model_name_or_path, getattr(model_args, "gguf_file", None))
    if getattr(config, "onpolicy_rounds", 0) or method == "perstep":
        check_verifier_name(rollout_args.verifier)
    # one writer per output_dir, from before the model loads until the final model is saved
    with locked_output_dir(config.output_dir, is_main=config.process_index == 0, num_processes=config.world_size):
        trainer = run_recipe(*recipe)
    if config.process_index == 0:
        print(saved_message(config.output_dir, trainer))
    close_rollout = getattr(getattr(trainer, "rollout", None), "close", None)  # D2O's and per-step's engine
    if callable(close_rollout):
        close_rollout()  # before the process group goes: vLLM's exit-time shutdown would find it gone
    _close_process_group()
    return 0


def _recipe_method(target: str) -> str:
    """The method of ``alignkit train TARGET --help``: TARGET itself, or the ``method`` of a recipe file."""
    from alignkit.recipes import METHODS

    if target in METHODS and not Path(target).exists():
        return target
    import yaml

    raw = yaml.safe_load(Path(target).read_text()) or {}
    method = raw.get("method") if isinstance(raw, dict) else None
    if method not in METHODS:
        from alignkit.did_you_mean import did_you_mean

        raise ValueError(f"{target}: the recipe's method {method!r} is not one of {', '.join(METHODS)}"
                         + did_you_mean(str(method), METHODS))
    return method


def _field_lines(cls, skip: set[str] = frozenset()) -> list[str]:
    import dataclasses

    lines = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            "(computed)" if f.default_factory is dataclasses.MISSING else f.default_factory())
        text = " ".join(str(f.metadata.get("help", "")).split())
        lines.append(f"  --{f.name} (default {default!r})" + (f": {text}" if text else ""))
    return lines


def train_help(method: str | None = None) -> str:
    """``alignkit train [METHOD] --help``: the recipe keys (= ``--key`` options) with their help: the
    method's own (every method's without one), then the model, data, rollout and plug-in keys."""
    import dataclasses

    from transformers import TrainingArguments

    from alignkit.compatibility import CompatArguments
    from alignkit.evaluation.flip_guard import FlipGuardArguments
    from alignkit.modeling import ModelArguments
    from alignkit.recipes import METHODS, DataArguments, method_classes
    from alignkit.rollout.arguments import RolloutArguments

    from alignkit.trainers.base import AlignConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    shared = {f.name for f in dataclasses.fields(AlignConfig)}
    out = [TRAIN_USAGE, "",
           "A recipe is a YAML mapping of these keys (plus 'method'); each is also a --key value override.", ""]
    if method is None:
        out += [f"methods: {', '.join(METHODS)}", "", "every method (AlignConfig):", *_field_lines(AlignConfig, base), ""]
    for name in [method] if method else list(METHODS):
        config_cls, trainer_cls = method_classes(name)
        out += [f"method {name} ({config_cls.__name__}, {trainer_cls.__name__}):",
                *_field_lines(config_cls, base | (shared if method is None else set())), ""]
    for title, cls in (("model", ModelArguments), ("data", DataArguments), ("rollout and verification", RolloutArguments),
                       ("compatibility term (plug-in)", CompatArguments), ("flip guard (plug-in)", FlipGuardArguments)):
        out += [f"{title} ({cls.__name__}):", *_field_lines(cls), ""]
    out.append(f"and every transformers.TrainingArguments field ({len(base)}: learning_rate, num_train_epochs, "
               "per_device_train_batch_size, output_dir, save_steps, report_to, ...).")
    return "\n".join(out)


def saved_message(output_dir: str, trainer=None) -> str:
    """The line ``alignkit train`` ends with: what was saved where."""
    directory = Path(output_dir)
    if (directory / "adapter_config.json").exists():
        what = "LoRA adapter"
    elif (directory / "config.json").exists():
        what = "model"
    else:
        return f"alignkit train: done; nothing saved in {directory} (no final model: see the log above)"
    card = " and model card README.md" if (directory / "README.md").exists() else ""
    return f"alignkit train: saved the {what}, tokenizer{card} to {directory.resolve()}"


def _close_process_group() -> None:
    """Under ``accelerate launch``: wait for every process, then shut the process group down before the
    interpreter exits (left to exit-time destructors, gloo can abort a process after its work is done)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _tiny_model(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit tiny-model")
    parser.add_argument("path")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    from alignkit.modeling import make_tiny_model

    print(make_tiny_model(a.path, a.arch, hidden_size=a.hidden_size, num_layers=a.num_layers, seed=a.seed))
    return 0


def _quickstart(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="alignkit quickstart",
        description="On-policy negatives end to end on SmolLM2-135M-Instruct (or --tiny: a tiny random model).")
    parser.add_argument("--output_dir", help="default: outputs/quickstart (outputs/quickstart_tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the smoke pipeline on a tiny random model (with an SFT stage)")
    parser.add_argument("--fast", action="store_true", help="a smoke-test size: every stage runs, nothing is learnt well")
    parser.add_argument("--sft_steps", type=int, help="--tiny: override the SFT steps")
    parser.add_argument("--update", choices=["dpo", "perstep"], default="dpo",
                        help="--tiny: dpo (on-policy pairs) or perstep (first-pit per-step DPO)")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    from dataclasses import replace

    from alignkit import quickstart

    if not a.tiny:
        if a.sft_steps or a.update != "dpo":
            parser.error("--sft_steps and --update apply to --tiny")
        settings = quickstart.QuickstartSettings.fast() if a.fast else quickstart.QuickstartSettings()
        quickstart.run_quickstart(a.output_dir or "outputs/quickstart", replace(settings, seed=a.seed))
        return 0
    settings = quickstart.TinyQuickstartSettings.fast() if a.fast else quickstart.TinyQuickstartSettings()
    settings = replace(settings, seed=a.seed, update=a.update, **({"sft_steps": a.sft_steps} if a.sft_steps else {}))
    quickstart.run_tiny_quickstart(a.output_dir or "outputs/quickstart_tiny", settings)
    return 0


def _load_prompts(source: str, limit: int | None) -> tuple[list[dict], list[int]]:
    """The rows to sample from and their row numbers (JSONL line numbers) for error messages."""
    if source.startswith("synthetic:"):
        from alignkit.recipes import DataArguments, load_data

        size = limit or 64
        data = load_data(source, DataArguments(synthetic_train_size=size), "problems", train=True)
        rows = data.to_list() if hasattr(data, "to_list") else list(data)
        return rows, list(range(1, len(rows) + 1))
    from alignkit.negatives import read_numbered_prompt_rows

    numbered = read_numbered_prompt_rows(source)[:limit] if limit else read_numbered_prompt_rows(source)
    return [row for _, row in numbered], [line for line, _ in numbered]


def _check_context(problems: list[dict], lines: list[int], tokenizer, context: int | None, source: str) -> None:
    """Refuse a prompt that surely has more tokens than the model's context, without tokenizing it whole."""
    if not context:
        return
    from alignkit.data.records import RecordError
    from alignkit.data.tokenize import tokens_over

    for line, problem in zip(lines, problems):
        chat = {"add_generation_prompt": True} if isinstance(problem["prompt"], list) else {}
        tokens = tokens_over(tokenizer, problem["prompt"], context, **chat)
        if tokens is not None:
            raise RecordError(source, line, "prompt", f"prompt has at least {tokens} tokens, more than the model's "
                                                      f"context of {context} tokens (max_position_embeddings)")


def _check_ranges(parser: argparse.ArgumentParser, a, rules: dict) -> None:
    """``parser.error`` (exit 2) for the first argument outside its range: ``{"--name": (value, ok, wanted)}``."""
    for name, (value, ok, wanted) in rules.items():
        if value is not None and not ok(value):
            parser.error(f"{name} must be {wanted}, got {value}")


def _rollout(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit rollout", description="Sample n completions per prompt.")
    parser.add_argument("--model", required=True, help="model path, hub id or tiny:qwen2")
    parser.add_argument("--adapter", help="a LoRA adapter directory to sample with (hf backend)")
    parser.add_argument("--prompts", required=True, help="JSONL with a 'prompt' per row, or synthetic:arithmetic_problems")
    parser.add_argument("--out", required=True)
    parser.add_argument("-n", type=int, default=8)
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm", "server"])
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, help="hf: rows decoded together (default: chosen from memory)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--base_url", default="http://localhost:8000", help="server backend URL")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vllm backend")
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="vllm backend")
    parser.add_argument("--no_token_data", action="store_true", help="do not store token ids and log-probs")
    parser.add_argument("--chat", default="auto",
                        help="text prompts as chat messages: auto (when the tokenizer has a chat template), true, false")
    parser.add_argument("--system_prompt", help="with chat: a system message put first in every prompt")
    a = parser.parse_args(argv)
    _check_ranges(parser, a, {
        "-n": (a.n, lambda v: v >= 1, ">= 1"), "--limit": (a.limit, lambda v: v >= 1, ">= 1"),
        "--temperature": (a.temperature, lambda v: v >= 0, ">= 0"), "--top_p": (a.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        "--top_k": (a.top_k, lambda v: v >= 0, ">= 0"), "--max_new_tokens": (a.max_new_tokens, lambda v: v >= 1, ">= 1"),
        "--batch_size": (a.batch_size, lambda v: v >= 1, ">= 1"),
    })

    import time

    from alignkit.modeling import load_for_generation, load_tokenizer, resolve_model_path
    from alignkit.negatives import completion_warnings, sample_rollouts, write_jsonl
    from alignkit.rollout import make_engine
    from alignkit.rollout.base import SamplingConfig

    problems, lines = _load_prompts(a.prompts, a.limit)
    sampling = SamplingConfig(
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens, stop=a.stop, seed=a.seed
    )
    if a.backend == "hf":
        model, tokenizer = load_for_generation(a.model, a.adapter, a.dtype)
        engine = make_engine("hf", model, tokenizer, batch_size=a.batch_size)
    elif a.backend == "vllm":
        tokenizer = load_tokenizer(resolve_model_path(a.model))
        engine = make_engine(
            "vllm", resolve_model_path(a.model), tokenizer,
            gpu_memory_utilization=a.gpu_memory_utilization, tensor_parallel_size=a.tensor_parallel_size,
            dtype=a.dtype,
        )
    else:
        tokenizer = load_tokenizer(resolve_model_path(a.model))
        engine = make_engine("server", None, tokenizer, base_url=a.base_url)
        engine.wait_until_ready(timeout=60)
    from alignkit.data.prompts import format_records

    try:
        problems = format_records(problems, tokenizer, a.chat, a.system_prompt)
    except ValueError as e:
        parser.error(str(e))
    if a.backend == "hf":
        _check_context(problems, lines, tokenizer, getattr(model.config, "max_position_embeddings", None), a.prompts)
    start = time.perf_counter()
    rows = sample_rollouts(engine, problems, a.n, sampling, keep_token_data=not a.no_token_data)
    seconds = time.perf_counter() - start
    write_jsonl(rows, a.out)
    completion_warnings(rows, where=a.out)
    stats = getattr(engine, "last_stats", None)  # hf: tokens decoded (including rows already ended) vs kept
    tokens = stats.kept_tokens if stats is not None else sum(len(c.get("token_ids") or []) for r in rows for c in r["completions"])
    finished = sum(c["finish_reason"] == "stop" for r in rows for c in r["completions"])
    total = len(rows) * a.n
    print(
        f"{len(rows)} prompts x {a.n} = {total} completions in {seconds:.1f}s ({total / seconds:.3g} completions/s)"
        + (f", {tokens} tokens kept ({tokens / seconds:.3g} tok/s)" if tokens else "")
        + (f" of {stats.generated_tokens} generated in {stats.decode_steps} decode steps" if stats is not None else "")
        + f"; {finished} stopped, {total - finished} hit max_new_tokens -> {a.out}"
    )
    return 0


def _verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit verify", description="Label completions with a verifier.")
    parser.add_argument("--verifier", default="math", help="math, code, match or a registered name")
    parser.add_argument("--input", required=True, help="rollout JSONL (from alignkit rollout)")
    parser.add_argument("--out", required=True, help="verified rollout JSONL")
    parser.add_argument("--num_workers", type=int, help="processes (default: CPU count)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per verification")
    parser.add_argument(
        "--verifier_option", action="append", default=[], metavar="KEY=VALUE",
        help="a verifier setting, e.g. mode=regex or rel_tol=1e-3 for match (repeatable; values parsed as JSON when they can be)",
    )
    parser.add_argument("--pairs", help="also write DPO pairs (correct vs incorrect, gold fallback) here")
    parser.add_argument("--pairs_per_prompt", type=int, default=1)
    parser.add_argument("--negatives", help="also write negatives-only records (D2O / NPO forget set) here")
    parser.add_argument("--summary_json", help="also write the summary as JSON here")
    a = parser.parse_args(argv)
    _check_ranges(parser, a, {
        "--timeout": (a.timeout, lambda v: v > 0, "> 0"), "--num_workers": (a.num_workers, lambda v: v >= 1, ">= 1"),
        "--pairs_per_prompt": (a.pairs_per_prompt, lambda v: v >= 1, ">= 1"),
    })

    import json
    import time

    from alignkit.negatives import (
        RolloutStats, check_problems, completion_warnings, negative_records, preference_pairs, read_numbered_rollouts,
        verify_rollouts, write_jsonl,
    )
    from alignkit.verifiers import get_verifier
    from alignkit.verifiers.base import parse_verifier_options

    check_verifier_name(a.verifier)  # a mistyped name before the input is read
    rows, lines = read_numbered_rollouts(a.input)  # every row checked before anything is verified or written
    try:
        options = parse_verifier_options(a.verifier_option)
    except ValueError as e:
        parser.error(str(e))
    verifier = get_verifier(a.verifier, timeout=a.timeout, num_workers=a.num_workers, **options)
    check_problems(rows, verifier, source=a.input, row_numbers=lines)  # no gold answer: an error, not a negative
    completion_warnings(rows, where=a.input)
    start = time.perf_counter()
    rows = verify_with_progress(rows, lines, verifier, num_workers=a.num_workers, source=a.input)
    stats = RolloutStats.of(rows, seconds=time.perf_counter() - start)
    write_jsonl(rows, a.out)
    summary = stats.to_dict()
    if a.pairs:
        summary["pairs"] = len(write_rows := preference_pairs(rows, pairs_per_prompt=a.pairs_per_prompt))
        write_jsonl(write_rows, a.pairs)
    if a.negatives:
        summary["negatives"] = len(negs := negative_records(rows))
        write_jsonl(negs, a.negatives)
    print(stats.format())
    for key in ("pairs", "negatives"):
        if key in summary:
            print(f"{summary[key]} {key} -> {getattr(a, key)}")
    if a.summary_json:
        with open(a.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def verify_with_progress(rows: list[dict], lines: list[int], verifier, *, num_workers=None, source: str,
                         chunk_completions: int = 4096) -> list[dict]:
    """``verify_rollouts`` in chunks of about ``chunk_completions`` completions, with a progress bar over the
    completions on stderr (the verifier's worker pool stays up between chunks)."""
    from tqdm.auto import tqdm

    from alignkit.negatives import verify_rollouts

    total = sum(len(r.get("completions") or ()) for r in rows)
    out: list[dict] = []
    with tqdm(total=total, desc=f"verify ({verifier.name})", unit="completion", file=sys.stderr) as bar:
        start = 0
        while start < len(rows):
            end, size = start, 0
            while end < len(rows) and (size == 0 or size + len(rows[end]["completions"]) <= chunk_completions):
                size += len(rows[end]["completions"])
                end += 1
            out += verify_rollouts(rows[start:end], verifier, num_workers=num_workers, source=source,
                                   row_numbers=lines[start:end])
            bar.update(size)
            start = end
    return out


def _flips(argv: list[str]) -> int:
    from alignkit.evaluation.flips_cli import flips_main

    return flips_main(argv)


def _evaluate(argv: list[str]) -> int:
    from alignkit.evaluation.flips_cli import evaluate_main

    return evaluate_main(argv)


def _unlearning_eval(argv: list[str]) -> int:
    from alignkit.evaluation.unlearning import unlearning_main

    return unlearning_main(argv)


def _serve(argv: list[str]) -> int:
    from alignkit.rollout.serve import serve_main

    return serve_main(argv)


COMMANDS = {
    "train": _train,
    "rollout": _rollout,
    "verify": _verify,
    "serve": _serve,
    "evaluate": _evaluate,
    "flips": _flips,
    "unlearning-eval": _unlearning_eval,
    "quickstart": _quickstart,
    "tiny-model": _tiny_model,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] not in COMMANDS:
        from alignkit.did_you_mean import did_you_mean

        print(f"alignkit: error: unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)} "
              f"(commands: {', '.join(COMMANDS)}; alignkit --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    import logging

    # alignkit's own progress messages (round statistics, cache hits) on stderr; libraries keep theirs
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[alignkit] %(message)s"))
    root = logging.getLogger("alignkit")
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.INFO)

    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        print(f"alignkit {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into the exit-code contract below
        if not is_input_error(e):
            import traceback

            traceback.print_exc()
            print(f"alignkit {argv[0]}: internal error (exit {EXIT_BUG}): this is a bug, please report it "
                  "with the traceback above", file=sys.stderr)
            return EXIT_BUG
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError quotes its message
        message = " ".join(text.split()) or type(e).__name__  # bad input: one line, not a traceback
        print(f"alignkit {argv[0]}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_model_source(name: str, gguf_file: str | None = None) -> None:
    """Refuse, in one line before anything loads, a model that cannot be loaded: a local path that does not
    exist or holds no model, or (offline) a hub id that is not in the Hugging Face cache."""
    from alignkit.modeling import EMBEDDED_MODELS, TINY_PREFIX

    if name.startswith(TINY_PREFIX) or name in EMBEDDED_MODELS or gguf_file:
        return
    path = Path(name).expanduser()
    known = [*EMBEDDED_MODELS, f"{TINY_PREFIX}qwen2", f"{TINY_PREFIX}llama"]
    if path.exists():
        if path.is_dir() and not any((path / f).exists() for f in ("config.json", "adapter_config.json")):
            raise UsageError(f"model {name!r}: the directory holds no model (no config.json)")
        return
    if name.startswith((".", "/", "~")) or "\\" in name or not _HUB_ID.match(name):
        from alignkit.did_you_mean import did_you_mean

        raise UsageError(f"model {name!r}: no such directory{did_you_mean(name, known)} (a model directory, a hub "
                         f"id, or one of {', '.join(known)})")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            from alignkit.did_you_mean import did_you_mean

            raise UsageError(f"model {name!r}: not a local directory and not in the Hugging Face cache, and the hub "
                             f"is offline (HF_HUB_OFFLINE=1): give a model directory, a cached hub id or one of "
                             f"{', '.join(known)}{did_you_mean(name, known)}")


if __name__ == "__main__":
    sys.exit(main())
