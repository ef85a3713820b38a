"""A model card (``README.md``) for every model or LoRA adapter an alignkit trainer saves.

Like TRL's ``create_model_card`` (``trl/trainer/base_trainer.py``, ``trl/templates/lm_model_card.md``): a
YAML header built by ``huggingface_hub.ModelCardData`` (base model, datasets, library, tags) and a body
with the method, the base model, the data, the key hyper-parameters, the final metrics and the method's
citation. Two parts:

* :func:`build_model_card` is pure: :class:`CardInfo` in, Markdown text out;
* :func:`card_info` collects a :class:`CardInfo` from a trainer (method from the trainer class, base model
  from the model's config or the adapter's ``base_model_name_or_path``, for the embedded ``smollm2`` the
  hub id stamped in the converted directory's ``alignkit_gguf.json``; data from the recipe or the
  datasets given to the trainer; hyper-parameters that differ from the config's defaults; the last value
  of every metric in ``trainer.state.log_history``), and :func:`write_model_card` writes the card.

``CheckpointingMixin.save_model`` calls :func:`write_model_card` after every save (final model and
checkpoints), after peft wrote its blank template ``README.md`` for an adapter, which the card replaces.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# what ``alignkit train`` calls each trainer (recipes.METHODS), by trainer class name
METHOD_OF_TRAINER = {"DPOTrainer": "dpo", "NPOTrainer": "npo", "D2OTrainer": "d2o", "SFTTrainer": "sft",
                     "PerStepTrainer": "perstep", "KTOTrainer": "kto"}
METHOD_TITLES = {"dpo": "DPO", "npo": "NPO", "simnpo": "SimNPO", "ga": "gradient ascent", "d2o": "D²O",
                 "perstep": "per-step negatives", "sft": "SFT", "kto": "KTO"}

# The paper of each method: title, arXiv id and its BibTeX entry, built from the same fields (DPO and KTO as
# TRL 1.16 cites them).
def _paper(kind: str, key: str, title: str, authors: str, year: int, arxiv: str, booktitle: str | None = None) -> dict:
    fields = [("title", f"{{{{{title}}}}}"), ("author", f"{{{authors}}}"), ("year", str(year))]
    fields += [("booktitle", f"{{{booktitle}}}")] if booktitle else []
    fields += [("eprint", f"{{arXiv:{arxiv}}}")]
    body = "".join(f"    {name:<12} = {value},\n" for name, value in fields)
    return {"title": title, "id": arxiv, "citation": f"@{kind}{{{key},\n{body}}}"}


PAPERS = {
    "dpo": _paper(
        "inproceedings", "rafailov2023direct",
        "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        "Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn",
        2023, "2305.18290", "Advances in Neural Information Processing Systems 36 (NeurIPS 2023)"),
    "npo": _paper(
        "inproceedings", "zhang2024negative",
        "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
        "Ruiqi Zhang and Licong Lin and Yu Bai and Song Mei",
        2024, "2404.05868", "First Conference on Language Modeling (COLM 2024)"),
    "simnpo": _paper(
        "article", "fan2024simplicity",
        "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning",
        "Chongyu Fan and Jiancheng Liu and Licong Lin and Jinghan Jia and Ruiqi Zhang and Song Mei and Sijia Liu",
        2024, "2410.07163"),
    "d2o": _paper(
        "article", "duan2024negating",
        "Negating Negatives: Alignment with Human Negative Samples via Distributional Dispreference Optimization",
        "Shitong Duan and Xiaoyuan Yi and Peng Zhang and Tun Lu and Xing Xie and Ning Gu",
        2024, "2403.03419"),
    "perstep": _paper(
        "inproceedings", "setlur2024rl",
        "RL on Incorrect Synthetic Data Scales the Efficiency of LLM Math Reasoning by Eight-Fold",
        "Amrith Setlur and Saurabh Garg and Xinyang Geng and Naman Garg and Virginia Smith and Aviral Kumar",
        2024, "2406.14532", "Advances in Neural Information Processing Systems 37 (NeurIPS 2024)"),
    "sft": _paper(
        "inproceedings", "ouyang2022training",
        "Training language models to follow instructions with human feedback",
        "Long Ouyang and Jeff Wu and Xu Jiang and Diogo Almeida and Carroll L. Wainwright and Pamela Mishkin and Chong Zhang and Sandhini Agarwal and Katarina Slama and Alex Ray and John Schulman and Jacob Hilton and Fraser Kelton and Luke Miller and Maddie Simens and Amanda Askell and Peter Welinder and Paul Christiano and Jan Leike and Ryan Lowe",
        2022, "2203.02155", "Advances in Neural Information Processing Systems 35 (NeurIPS 2022)"),
    "kto": _paper(
        "article", "ethayarajh2024kto",
        "KTO: Model Alignment as Prospect Theoretic Optimization",
        "Kawin Ethayarajh and Winnie Xu and Niklas Muennighoff and Dan Jurafsky and Douwe Kiela",
        2024, "2402.01306"),
}

# hyper-parameters always shown; any other config field is shown when it differs from its default
KEY_HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                       "gradient_accumulation_steps", "seed", "beta", "loss_type")
# fields that describe the run's plumbing, not the training
_NOT_HYPERPARAMETERS = {
    "output_dir", "logging_dir", "run_name", "report_to", "hub_token", "hub_model_id", "push_to_hub",
    "overwrite_output_dir", "resume_from_checkpoint", "ref_logps_cache_dir", "logging_steps", "logging_strategy",
    "save_steps", "save_strategy", "save_total_limit", "eval_steps", "eval_strategy", "disable_tqdm", "use_cpu",
    "dataloader_num_workers", "local_rank", "dataset_num_proc", "logging_first_step", "remove_unused_columns",
    "dataloader_pin_memory", "debug",
}
# log_history keys that are bookkeeping, not metrics
_NOT_METRICS = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "grad_norm", "learning_rate"}


@dataclass
class CardInfo:
    """What a model card says."""

    method: str  # recipes.METHODS name: dpo, npo, d2o, perstep, sft, kto
    model_name: str  # the saved directory's name
    base_model: str | None = None  # a hub id, or a local path when there is none
    peft: bool = False
    variant: str | None = None  # the config's loss_type (npo_rt, simnpo, ipo, ...)
    datasets: dict[str, str] = field(default_factory=dict)  # role (train, eval, ...) -> source
    hyperparameters: dict[str, object] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int | None = None
    recipe: str | None = None
    versions: dict[str, str] = field(default_factory=dict)


def paper_of(method: str, variant: str | None = None) -> dict | None:
    """The paper to cite for a method (SimNPO for NPO's ``simnpo`` losses)."""
    if method == "npo" and variant and variant.startswith("simnpo"):
        return PAPERS["simnpo"]
    return PAPERS.get(method)


def tags_of(info: CardInfo) -> list[str]:
    """TRL's tag scheme: the library, the method, ``lora`` for an adapter."""
    named_variant = info.method == "npo" and info.variant and info.variant != "npo"  # npo_rt, simnpo, ga: methods
    return ["alignkit", info.method, *([info.variant] if named_variant else []), *(["lora"] if info.peft else [])]


# names that are files, not hub repositories
_FILE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".arrow", ".gguf")


def _is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a hub repository id (``org/name`` or ``name``), not a local path or a source
    such as ``synthetic:...``: only hub ids go into the card's YAML header."""
    return bool(name) and not os.path.isabs(name) and not name.startswith((".", "~")) and not os.path.isdir(name) \
        and name.count("/") <= 1 and ":" not in name and " " not in name and "\\" not in name \
        and not name.lower().endswith(_FILE_SUFFIXES)


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(getattr(v, "value", v))


def build_model_card(info: CardInfo) -> str:
    """The ``README.md`` text of a saved model or adapter (pure)."""
    from huggingface_hub import ModelCardData

    hub_datasets = [s for s in info.datasets.values() if _is_hub_id(s)]
    data = ModelCardData(
        base_model=info.base_model if _is_hub_id(info.base_model) else None,
        datasets=hub_datasets or None,
        library_name="peft" if info.peft else "transformers",
        model_name=info.model_name,
        tags=tags_of(info),
        pipeline_tag="text-generation",
    )
    title = METHOD_TITLES.get(info.variant or "", None) if info.method == "npo" else None
    method = title or METHOD_TITLES.get(info.method, info.method)
    kind = "a LoRA adapter for" if info.peft else "a fine-tuned version of"
    base = f"[{info.base_model}](https://huggingface.co/{info.base_model})" if _is_hub_id(info.base_model) else (
        f"`{info.base_model}`" if info.base_model else "an unnamed base model")
    lines = ["---", data.to_yaml(), "---", "", f"# Model Card for {info.model_name}", "",
             f"This model is {kind} {base}, trained with **{method}**"
             + (f" (`loss_type: {info.variant}`)" if info.variant else "")
             + " with alignkit (on `transformers.Trainer`).", ""]
    if info.peft:
        lines += ["Load it with `peft.AutoPeftModelForCausalLM.from_pretrained(<this directory>)`.", ""]
    lines += ["## Training data", ""]
    lines += [f"- {role}: `{source}`" for role, source in info.datasets.items()] or ["- not recorded"]
    if info.recipe:
        lines += [f"- recipe: `{info.recipe}`"]
    lines += ["", "## Training procedure", ""]
    paper = paper_of(info.method, info.variant)
    if paper:
        lines += [f"{method} was introduced in [{paper['title']}](https://huggingface.co/papers/{paper['id']}).", ""]
    if info.hyperparameters:
        lines += ["### Hyper-parameters", "", "| key | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {_value(v)} |" for k, v in info.hyperparameters.items()] + [""]
    if info.metrics:
        where = f" (step {info.global_step})" if info.global_step is not None else ""
        lines += [f"### Results at the end of training{where}", "", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {_value(v)} |" for k, v in info.metrics.items()] + [""]
    if info.versions:
        lines += ["### Framework versions", ""] + [f"- {k}: {v}" for k, v in info.versions.items()] + [""]
    lines += ["## Citations", ""]
    if paper:
        lines += [f"Cite {method} as:", "", "```bibtex", paper["citation"], "```", ""]
    else:
        lines += ["No method paper recorded.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ from a trainer


def base_model_name(model) -> str | None:
    """The base model's hub id (a local path when it has none): a PEFT adapter's ``base_model_name_or_path``
    or the config's ``_name_or_path``; a directory converted from GGUF names its hub id in ``alignkit_gguf.json``."""
    name = None
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        name = getattr(next(iter(peft_config.values())), "base_model_name_or_path", None)
    if not name:
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or None
    if name and os.path.isdir(name):
        stamp = Path(name) / "alignkit_gguf.json"
        try:
            hub_id = json.loads(stamp.read_text()).get("hub_id") if stamp.exists() else None
        except (OSError, ValueError):
            hub_id = None
        name = hub_id or name
    return name


def describe_source(data) -> str | None:
    """A dataset as a card names it: its path or hub id, else what it is."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    from alignkit.data.loading import record_source

    source = record_source(data)
    if source:
        return source
    if isinstance(data, dict):  # several eval sets
        return ", ".join(f"{k}: {describe_source(v)}" for k, v in data.items())
    try:
        return f"{type(data).__name__} of {len(data):,} records"
    except TypeError:
        return type(data).__name__


def changed_hyperparameters(config) -> dict[str, object]:
    """The key hyper-parameters and every other config field whose value differs from its declared default."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name.startswith("_") or f.name in _NOT_HYPERPARAMETERS or not f.init:
            continue
        value = getattr(config, f.name, None)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        default = getattr(default, "value", default)
        plain = getattr(value, "value", value)
        differs = plain != default and not (not plain and not default)  # False vs None, [] vs "" are no change
        if f.name in KEY_HYPERPARAMETERS or differs:
            if isinstance(plain, (str, int, float, bool)) or plain is None:
                out[f.name] = plain
            elif isinstance(plain, (list, tuple, dict)) and len(json.dumps(plain, default=str)) < 200:
                out[f.name] = json.dumps(plain, default=str)
    if out.get("max_steps", 0) in (-1, 0):
        out.pop("max_steps", None)
    return out


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every metric (training terms, the train summary, eval results)."""
    out = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            out[key] = value
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("alignkit", "transformers", "trl", "peft", "torch", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def lora_hyperparameters(model) -> dict[str, object]:
    """An adapter's LoRA settings (rank, alpha, dropout, target modules) from its peft config; ``{}`` otherwise."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return {}
    config = next(iter(peft_config.values()))
    out = {}
    for key, name in (("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                      ("target_modules", "lora_target_modules")):
        value = getattr(config, key, None)
        if isinstance(value, (set, frozenset, list, tuple)):
            value = ", ".join(sorted(map(str, value)))
        if value is not None:
            out[name] = value
    return out


def _is_peft_model(model) -> bool:
    # as alignkit.trainers.base.is_peft_model; not imported from there (trainers -> checkpointing -> here)
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def card_info(trainer, output_dir) -> CardInfo:
    """A :class:`CardInfo` of ``trainer``'s model as saved in ``output_dir``."""
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    args = trainer.args
    recipe = getattr(args, "_alignkit_recipe", None) or {}
    method = recipe.get("method") or METHOD_OF_TRAINER.get(type(trainer).__name__) or \
        type(trainer).__name__.removesuffix("Trainer").lower()
    sources = {role: recipe[key] for role, key in (("train", "train_data"), ("eval", "eval_data"),
                                                   ("retain", "retain_data"), ("compatibility", "compat_data"),
                                                   ("flip guard", "flip_guard_data")) if recipe.get(key)}
    if not sources:
        sources = {k: v for k, v in (getattr(trainer, "_card_sources", None) or {}).items() if v}
    resolved = base_model_name(model)  # a hub id where one is known (smollm2: its stamp)
    base = resolved if _is_hub_id(resolved) else (recipe.get("model") or resolved)
    variant = getattr(args, "loss_type", None)
    return CardInfo(
        method=method,
        model_name=Path(output_dir).resolve().name,
        base_model=base,
        peft=_is_peft_model(model),
        variant=variant if isinstance(variant, str) else None,
        datasets=sources,
        hyperparameters={**changed_hyperparameters(args), **lora_hyperparameters(model)},
        metrics=final_metrics(trainer.state.log_history),
        global_step=trainer.state.global_step,
        recipe=recipe.get("path"),
        versions=_versions(),
    )


def write_model_card(trainer, output_dir) -> Path:
    """Write ``output_dir/README.md`` for ``trainer``'s saved model (replacing peft's template)."""
    path = Path(output_dir) / "README.md"
    path.write_text(build_model_card(card_info(trainer, output_dir)), encoding="utf-8")
    return path
