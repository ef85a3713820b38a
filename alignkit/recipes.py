"""YAML recipes: one file names a method and sets its config, model and data arguments.

A recipe is a flat mapping, as in TRL's recipes::

    method: dpo
    model_name_or_path: tiny:qwen2
    train_data: synthetic:arithmetic_pairs
    beta: 0.1
    output_dir: outputs/dpo_tiny

``HfArgumentParser`` splits the keys between the method's ``*Config`` (a ``TrainingArguments``),
:class:`~alignkit.modeling.ModelArguments`, :class:`DataArguments`,
:class:`~alignkit.rollout.arguments.RolloutArguments` (sampling and verification, for the methods that
sample) and the plug-ins' keys: :class:`~alignkit.compatibility.CompatArguments` (``compat_*``) and
:class:`~alignkit.evaluation.flip_guard.FlipGuardArguments` (``flip_guard_*``); command-line ``--key value``
pairs override the file. Unknown keys are an error that names the recipe and the key.

The recipe layer attaches the plug-ins: :func:`plugins` loads the compatibility records and the flip
guard's problems with the recipe's data settings (so they are chat-formatted like the training data) and
gives the trainer its ``aux_losses`` and ``callbacks``.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml
from peft import get_peft_model
from transformers import HfArgumentParser, set_seed

from alignkit.checkpoints import resolve_resume_checkpoint
from alignkit.compatibility import CompatArguments
from alignkit.data.loading import load_records, load_records_of_kinds
from alignkit.data.prompts import chat_mode, format_records, use_chat
from alignkit.did_you_mean import did_you_mean
from alignkit.evaluation.flip_guard import FlipGuardArguments
from alignkit.modeling import ModelArguments, load_model_and_tokenizer, lora_config
from alignkit.onpolicy import run_onpolicy_rounds
from alignkit.rollout.arguments import RolloutArguments
from alignkit.tasks import arithmetic, negative_class, synthetic_tofu
from alignkit.tasks.tofu import load_tofu_records
from alignkit.trainers.sft import sft_records

METHODS = {
    "dpo": ("alignkit.trainers.dpo", "DPOConfig", "DPOTrainer"),
    "npo": ("alignkit.trainers.npo", "NPOConfig", "NPOTrainer"),
    "d2o": ("alignkit.trainers.d2o", "D2OConfig", "D2OTrainer"),
    "sft": ("alignkit.trainers.sft", "SFTConfig", "SFTTrainer"),
    "perstep": ("alignkit.trainers.perstep", "PerStepConfig", "PerStepTrainer"),
    "kto": ("alignkit.trainers.kto", "KTOConfig", "KTOTrainer"),
}
SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class DataArguments:
    """Where the training and evaluation records come from."""

    train_data: str = field(
        default="synthetic:arithmetic_pairs",
        metadata={
            "help": "JSONL/Parquet path, save_to_disk dir, hub id, synthetic:arithmetic_pairs, "
            "synthetic:arithmetic_problems, synthetic:arithmetic_sft, synthetic:arithmetic_chat_problems / "
            "_sft / _pairs / _wrong (the chat task for real instruct models; eval sources draw from its held-out part), "
            "gsm8k:<path or hub id> (GSM8K format as problems), champ, "
            "synthetic:tofu_forgetNN / synthetic:tofu_retainMM (alignkit.tasks.synthetic_tofu) or "
            "tofu:<split> (TOFU-format data from tofu_data, e.g. tofu:forget10)."
        },
    )
    eval_data: str | None = field(default=None, metadata={"help": "Same forms as train_data."})
    retain_data: str | None = field(
        default=None, metadata={"help": "Unlearning (npo): the retain set, same forms as train_data (the forget set)."}
    )
    tofu_data: str = field(
        default="locuslab/TOFU",
        metadata={"help": "Where tofu:<split> sources read from: a hub id or a directory of <split>.json(l) files."},
    )
    train_split: str = "train"
    eval_split: str = "test"
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    synthetic_train_size: int = 512
    synthetic_eval_size: int = 64
    synthetic_seed: int = 0
    chat: str = field(
        default="auto",
        metadata={"help": "Text prompts as chat messages: auto (when the tokenizer has a chat template), true, or "
                          "false (raw text, e.g. for models trained on raw text). See alignkit.data.prompts."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "With chat: a system message put first in every prompt that has none."}
    )

    def __post_init__(self):
        self.chat = chat_mode(self.chat)


def method_classes(method: str):
    """The (config class, trainer class) of a method name."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    module, config_name, trainer_name = METHODS[method]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, trainer_name)


class Recipe(NamedTuple):
    """A parsed recipe: ``run_recipe(*recipe)`` runs it."""

    method: str
    config: object
    model_args: ModelArguments
    data_args: DataArguments
    rollout_args: RolloutArguments
    compat_args: CompatArguments
    flip_guard_args: FlipGuardArguments


def parse_recipe(path: str | Path | None, overrides: list[str] | None = None, method: str | None = None) -> Recipe:
    """Read a recipe and apply ``--key value`` overrides (see :class:`Recipe`)."""
    raw = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe must be a mapping of keys to values")
    method = raw.pop("method", None) or method
    if method is None:
        raise ValueError(f"{path}: the recipe has no 'method' (one of {sorted(METHODS)})")
    if method not in METHODS:
        raise ValueError(f"{path}: unknown method {method!r}{did_you_mean(str(method), METHODS)} "
                         f"(methods: {', '.join(METHODS)})")
    config_cls, _ = method_classes(method)
    classes = (config_cls, ModelArguments, DataArguments, RolloutArguments, CompatArguments, FlipGuardArguments)
    parser = HfArgumentParser(classes)
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = [str(key) for key in raw if key not in known]  # a typo names the key and the closest real ones
    if len(unknown) == 1:
        raise ValueError(f"{path}: unknown recipe key {unknown[0]!r} for method {method!r}"
                         f"{did_you_mean(unknown[0], known)} (alignkit train {method} --help lists the keys)")
    if unknown:
        named = ", ".join(repr(k) + did_you_mean(k, known).replace("; did you mean", " (did you mean").replace("?", "?)")
                          for k in unknown)
        raise ValueError(f"{path}: unknown recipe keys for method {method!r}: {named} "
                         f"(alignkit train {method} --help lists the keys)")
    for token in overrides or []:
        name = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None
        if name is not None and name not in known and not (name.startswith("no_") and name[3:] in known):
            raise ValueError(f"unknown option --{name} for method {method!r}{did_you_mean(name, known, prefix='--')} "
                             f"(alignkit train {method} --help lists the keys)")
    parser.set_defaults(**raw)
    recipe = Recipe(method, *parser.parse_args_into_dataclasses(args=overrides or []))
    # what the model card names (alignkit.model_card): an attribute, not a field, so never serialised with the args
    recipe.config._alignkit_recipe = {
        "path": str(path) if path is not None else None, "method": method,
        "model": recipe.model_args.model_name_or_path, "train_data": recipe.data_args.train_data,
        "eval_data": recipe.data_args.eval_data, "compat_data": getattr(recipe.compat_args, "compat_data", None),
        "flip_guard_data": getattr(recipe.flip_guard_args, "flip_guard_data", None),
    }
    return recipe


def load_data(source: str | None, data_args: DataArguments, kind: str, *, train: bool, tokenizer=None):
    """Records for a trainer: a local path as is (so errors name the file), generated synthetic
    records, or a hub dataset loaded with its split and configuration.

    With a ``tokenizer``, text prompts become chat messages as ``data_args.chat`` / ``system_prompt`` say
    (:mod:`alignkit.data.prompts`; a local file is then loaded and validated here)."""
    records = _load_source(source, data_args, kind, train=train)
    if records is None or tokenizer is None:
        return records
    if not use_chat(tokenizer, data_args.chat):
        return records
    if isinstance(records, (str, Path)):
        records, _ = load_records_of_kinds(str(records), kind)
    return format_records(records, tokenizer, data_args.chat, data_args.system_prompt)


def _load_source(source: str | None, data_args: DataArguments, kind: str, *, train: bool):
    if source is None:
        return None
    if source.startswith(SYNTHETIC_PREFIX):
        name = source[len(SYNTHETIC_PREFIX) :]
        size = data_args.synthetic_train_size if train else data_args.synthetic_eval_size
        seed = data_args.synthetic_seed if train else data_args.synthetic_seed + 10_000
        if name == "arithmetic_pairs":
            return arithmetic.make_preference_pairs(size, seed=seed)
        if name == "arithmetic_problems":
            return arithmetic.make_problems(size, seed=seed)
        if name == "arithmetic_sft":  # gold step-by-step solutions as SFT records
            return sft_records(arithmetic.make_problems(size, seed=seed))
        if name.startswith("arithmetic_chat_"):  # the chat task: train / held-out parts never overlap
            split = "train" if train else "heldout"
            if name == "arithmetic_chat_problems":
                return arithmetic.make_chat_problems(size, seed=seed, split=split)
            if name == "arithmetic_chat_sft":
                return sft_records(arithmetic.make_chat_problems(size, seed=seed, split=split))
            if name == "arithmetic_chat_pairs":  # also negatives records (prompt, rejected) for D2O
                return arithmetic.make_chat_preference_pairs(size, seed=seed, split=split)
            if name == "arithmetic_chat_wrong":  # one-slip solutions as SFT records: an NPO forget set
                pairs = arithmetic.make_chat_preference_pairs(size, seed=seed, split=split)
                return [{"prompt": p["prompt"], "response": p["rejected"], "answer": p["answer"]} for p in pairs]
        if name == "negative_class":  # negatives records: training prompts to train, held-out prompts to eval
            spec = negative_class.NegativeClassSpec(seed=data_args.synthetic_seed)
            return negative_class.negative_records(spec, split="train" if train else "heldout")
        if name.startswith("tofu_"):  # one synthetic world per seed: train and eval splits share it
            spec = synthetic_tofu.SyntheticTofuSpec(seed=data_args.synthetic_seed)
            return synthetic_tofu.records(name[len("tofu_") :], spec)
        raise ValueError(
            f"unknown synthetic dataset {name!r}; available: arithmetic_pairs, arithmetic_problems, arithmetic_sft, "
            "arithmetic_chat_problems, arithmetic_chat_sft, arithmetic_chat_pairs, arithmetic_chat_wrong, negative_class, tofu_forgetNN, "
            "tofu_retainMM"
        )
    if source.startswith("tofu:"):
        return load_tofu_records(data_args.tofu_data, source[len("tofu:") :])
    if source.startswith("gsm8k:"):
        from alignkit.tasks.gsm8k import load_gsm8k

        split = data_args.train_split if train else data_args.eval_split
        return load_gsm8k(source[len("gsm8k:") :], split=split, name=data_args.dataset_config or "main")
    if source == "champ":
        from alignkit.tasks.champ import load_champ_problems

        return load_champ_problems()
    if Path(source).exists():
        return source
    split = data_args.train_split if train else data_args.eval_split
    return load_records_of_kinds(source, kind, split=split, name=data_args.dataset_config)[0]


def resolve_resume(config) -> str | None:
    """``resume_from_checkpoint``: a path (which must be a complete checkpoint), or ``auto`` / ``true`` /
    ``last`` for the newest *complete* checkpoint in output_dir, ``None`` when there is none (the newer
    incomplete ones are logged with the reason they were skipped; :mod:`alignkit.checkpoints`)."""
    return resolve_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)


def _records_list(data, kind: str = "problems") -> list[dict]:
    if isinstance(data, (str, Path)):
        data = load_records(str(data), kind)
    return data.to_list() if hasattr(data, "to_list") else list(data)


def plugins(tokenizer, data_args: DataArguments, compat_args: CompatArguments | None,
            flip_guard_args: FlipGuardArguments | None) -> dict:
    """The trainer keyword arguments of the recipe's plug-ins: ``aux_losses`` (the compatibility term when
    ``compat_weight`` > 0) and ``callbacks`` (the flip guard when ``flip_guard_data`` is set). Their records
    are read like the training data (recipe sources, chat formatting)."""
    out: dict = {"aux_losses": [], "callbacks": []}
    if compat_args is not None:
        records = None
        if compat_args.compat_data:
            records = load_data(compat_args.compat_data, data_args, "sft", train=True, tokenizer=tokenizer)
        term = compat_args.term(records)
        if term is not None:
            out["aux_losses"].append(term)
    if flip_guard_args is not None and flip_guard_args.flip_guard_data:
        held_out = dataclasses.replace(data_args, synthetic_eval_size=flip_guard_args.flip_guard_max_items)
        problems = _records_list(load_data(flip_guard_args.flip_guard_data, held_out, "problems", train=False,
                                           tokenizer=tokenizer))
        out["callbacks"].append(flip_guard_args.callback(problems, tokenizer=tokenizer))
    return out


def run_onpolicy_recipe(method, config, model_args, data_args, rollout_args, compat_args=None, flip_guard_args=None):
    """On-policy rounds (``onpolicy_rounds > 0``): problems in, rounds of rollout/verify/train."""
    _, trainer_cls = method_classes(method)
    model, tokenizer = load_model_and_tokenizer(model_args)
    peft_config = lora_config(model_args)
    if peft_config is not None:  # attach once: the engine and every round's trainer share the adapter
        model = get_peft_model(model, peft_config)
    problems = _records_list(load_data(data_args.train_data, data_args, "problems", train=True, tokenizer=tokenizer))
    trainer, model = run_onpolicy_rounds(
        trainer_cls=trainer_cls,
        config=config,
        model=model,
        tokenizer=tokenizer,
        problems=problems,
        rollout_args=rollout_args,
        build_records=lambda rows: trainer_cls.onpolicy_records(config, rows),
        eval_dataset=load_data(data_args.eval_data, data_args, trainer_cls.record_kind, train=False, tokenizer=tokenizer),
        resume=str(config.resume_from_checkpoint).lower() not in ("none", "false", ""),
        round_plugins=lambda: plugins(tokenizer, data_args, compat_args, flip_guard_args),
    )
    if trainer is not None:
        trainer.save_model(config.output_dir)
    return trainer


def run_recipe(method, config, model_args, data_args, rollout_args=None, compat_args=None, flip_guard_args=None):
    """Load the model, build the trainer with the recipe's plug-ins, train (resuming if asked), save
    model/adapter and tokenizer."""
    _, trainer_cls = method_classes(method)
    set_seed(config.seed)
    if getattr(config, "onpolicy_rounds", 0):
        return run_onpolicy_recipe(method, config, model_args, data_args, rollout_args or RolloutArguments(),
                                   compat_args, flip_guard_args)
    extra = {}
    if data_args.retain_data is not None and not getattr(trainer_cls, "uses_retain_data", False):
        raise ValueError(f"retain_data is for unlearning methods (npo); method {method!r} does not use it")
    if getattr(trainer_cls, "uses_rollout_args", False):  # methods that sample (D2O reference samples)
        extra["rollout_args"] = rollout_args or RolloutArguments()
    model, tokenizer = load_model_and_tokenizer(model_args)
    kind = trainer_cls.record_kind
    if data_args.retain_data is not None:
        extra["retain_dataset"] = load_data(data_args.retain_data, data_args, kind, train=True, tokenizer=tokenizer)

    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=load_data(data_args.train_data, data_args, kind, train=True, tokenizer=tokenizer),
        eval_dataset=load_data(data_args.eval_data, data_args, kind, train=False, tokenizer=tokenizer),
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        **plugins(tokenizer, data_args, compat_args, flip_guard_args),
        **extra,
    )
    trainer.train(resume_from_checkpoint=resolve_resume(config))
    trainer.save_model(config.output_dir)
    trainer.save_state()
    return trainer
