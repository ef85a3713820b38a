"""K responses per prompt sampled through a rollout engine, cached on disk under a fingerprint.

D²O (:mod:`alignkit.trainers.d2o`) needs, for every prompt, K responses sampled from the reference
policy. Sampling is the expensive part of a run, so the samples are written once as JSON Lines and
reused by every later run with the same inputs::

    <cache_dir>/<name>-<fingerprint>.jsonl   one line per distinct prompt: {"prompt": ..., "samples": [K texts]}
    <cache_dir>/<name>-<fingerprint>.json    what the fingerprint was computed from (for people)

The fingerprint (:func:`samples_fingerprint`) covers everything that changes the samples' distribution
or their number: the model's name/path and a digest of its weights (:func:`weights_digest`), the
prompts (in order), the sampling settings (temperature, top-p, top-k, max new tokens, stop strings,
seed), the backend, K and the instruction prefix. Changing any of them misses the cache.

With several processes the main process alone reads the cache and tells the others (no process can
take the sampling path alone); on a miss each process samples its share of the prompts and every
process gets all samples back in prompt order (``accelerate``'s ``split_between_processes`` +
``gather_object``); the main process writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from alignkit.data.loading import read_json_lines
from alignkit.negatives import write_jsonl
from alignkit.rollout.base import Prompt, RolloutEngine, SamplingConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def prompt_key(prompt: Prompt) -> str:
    """A canonical string of a prompt (text or chat messages), to deduplicate and hash prompts."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def with_instruction_prefix(prompt: Prompt, prefix: str | None) -> Prompt:
    """The prompt a sample is drawn under: ``prefix + prompt`` for text; for chat messages the prefix is
    prepended to the first user message's content (roles and the other messages are left as they are)."""
    if not prefix:
        return prompt
    if isinstance(prompt, str):
        return prefix + prompt
    messages = [dict(m) for m in prompt]
    for message in messages:
        if message.get("role") == "user":
            message["content"] = prefix + message["content"]
            return messages
    return [{"role": "user", "content": prefix}] + messages


def weights_digest(model: torch.nn.Module, *, exclude: Sequence[str] = ("lora_",)) -> str:
    """A short digest of a model's weights: per parameter its name, shape, L2 norm and the sum of a strided
    subsample (values rounded to 7 significant digits, so the same weights on another device or in
    another process give the same digest). Parameters whose name contains an ``exclude`` string (LoRA
    weights by default: the reference is the base) are skipped, as are empty shards (DeepSpeed ZeRO-3
    keeps parameters partitioned; there the names and shapes stand for the weights). Names are taken
    without peft's wrapper prefixes, so a base model and the same base under an adapter agree."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(x in name for x in exclude):
                continue
            # a peft wrapper's names are the base model's names: LoRA and full runs share the cache
            name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            shape = tuple(getattr(param, "ds_shape", None) or param.shape)
            h.update(f"{name}{shape}".encode())
            if param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // 4096)
            norm = float(flat.float().norm())
            subsample = float(flat[::stride].double().sum())
            h.update(f"{norm:.7g},{subsample:.7g}".encode())
    return h.hexdigest()[:16]


def model_identity(model: torch.nn.Module) -> str:
    """The model's name or path as loaded (``config._name_or_path``)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)


def samples_fingerprint(
    *,
    model: str,
    weights: str,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    backend: str,
    num_samples: int,
    instruction_prefix: str | None,
) -> tuple[str, dict]:
    """``(fingerprint, key)``: a 20-hex-digit hash of everything the samples depend on, and the key it
    was computed from (the prompts appear as their count and hash)."""
    prompts_hash = hashlib.sha256("\n".join(prompt_key(p) for p in prompts).encode()).hexdigest()[:16]
    settings = sampling.to_dict()
    settings.pop("logprobs", None)  # the cache stores texts only
    key = {
        "version": CACHE_FORMAT_VERSION,
        "model": model,
        "weights": weights,
        "prompts": {"count": len(prompts), "sha256": prompts_hash},
        "sampling": settings,
        "backend": backend,
        "num_samples": num_samples,
        "instruction_prefix": instruction_prefix or "",
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20], key


class SamplesCache:
    """The JSONL sample files of one cache directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, name: str, fingerprint: str) -> Path:
        return self.directory / f"{name}-{fingerprint}.jsonl"

    def load(self, name: str, fingerprint: str, prompts: Sequence[Prompt]) -> list[list[str]] | None:
        """The cached samples for ``prompts`` (in order), or ``None`` on a miss. A file that does not hold
        exactly these prompts (an interrupted or foreign file) is a miss too."""
        path = self.path(name, fingerprint)
        if not path.exists():
            return None
        rows = [row for _, row in read_json_lines(path)]
        if len(rows) != len(prompts) or any(prompt_key(r["prompt"]) != prompt_key(p) for r, p in zip(rows, prompts)):
            logger.warning("%s does not match its prompts; sampling again", path)
            return None
        return [list(r["samples"]) for r in rows]

    def save(self, name: str, fingerprint: str, key: dict, prompts: Sequence[Prompt], samples: Sequence[Sequence[str]]) -> Path:
        """Write the samples (atomically) and the key next to them; returns the JSONL path."""
        path = self.path(name, fingerprint)
        self.directory.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(key, indent=2, ensure_ascii=False))
        write_jsonl(({"prompt": p, "samples": list(s)} for p, s in zip(prompts, samples)), path)
        return path


def on_main_process(compute):
    """``compute()`` run on the main process only, its (picklable) result sent to every process: one
    process decides, e.g. whether a cache file exists, so the processes never take different paths."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return compute()
    box = [compute() if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def sample_texts(
    engine: RolloutEngine,
    prompts: Sequence[Prompt],
    num_samples: int,
    sampling: SamplingConfig,
    *,
    instruction_prefix: str | None = None,
    context=None,
) -> list[list[str]]:
    """``num_samples`` completion texts per prompt, in prompt order, under ``instruction_prefix``.

    ``context`` (a context manager, e.g. a peft model's ``disable_adapter()``) is entered around the
    engine call. With several processes each samples a contiguous share of the prompts and all get the
    full list back (every process must call this).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    def generate(share: list) -> list[list[str]]:
        if not share:
            return []
        with context if context is not None else nullcontext():
            groups = engine.generate([with_instruction_prefix(p, instruction_prefix) for p in share], n=num_samples,
                                     sampling=sampling)
        return [[c.text for c in group] for group in groups]

    state = PartialState()
    if state.num_processes == 1:
        return generate(list(prompts))
    with state.split_between_processes(list(prompts)) as share:
        texts = generate(list(share))
    return gather_object(texts)
