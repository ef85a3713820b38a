"""One cache for what a run computes once and reuses: fingerprint, atomic store, main process decides.

Five things in alignkit are expensive to compute and cheap to keep, and each is cached through this
module:

==========================  =================================================  ===================================
what                        written by                                         where (default)
==========================  =================================================  ===================================
reference log-probs         :meth:`AlignTrainer.precompute_reference_logps`    ``OUTPUT_DIR/ref_logps``
D²O reference samples       :func:`alignkit.reference_samples.cached_samples`  ``OUTPUT_DIR/d2o_samples``
per-step records            :class:`alignkit.trainers.perstep.PerStepTrainer`  ``OUTPUT_DIR/perstep_records``
flip-guard baseline         :class:`alignkit.evaluation.flip_guard.FlipGuardCallback`  ``OUTPUT_DIR/flip_guard_baseline.json``
on-policy state             :func:`alignkit.onpolicy.run_onpolicy_rounds`      ``OUTPUT_DIR/onpolicy_state.json``
==========================  =================================================  ===================================

**Fingerprint.** A cache entry is described by a *key*: a JSON-able mapping of everything its value
depends on. A model enters a key through :func:`model_key`: its name or path AND :func:`weights_digest`,
a digest of every parameter (name, shape, L2 norm and a strided subsample sum of each), so one changed
middle-layer weight is another key even at the same path and output directory. Lists of prompts or
problems enter through :func:`json_digest`. :func:`fingerprint` is the SHA-256 of the key's canonical JSON.

**Atomic store.** :meth:`CacheEntry.store` writes the value to a temporary file and renames it into place,
then writes the key next to it (``<file>.key.json``, also atomically), after removing the old key file
first: whatever moment a run is killed at, a value is never paired with a key it was not computed for.
An entry counts (:meth:`CacheEntry.matches`) only when its value and its key file exist and the stored
key equals the key asked for.

**Main process decides.** In a distributed run only the main process checks the entry and broadcasts
hit or miss (:func:`on_main_process`), so the processes never take different paths. On a hit every
process reads the file. On a miss the value is computed by the main process alone, or by every process
together when ``collective=True`` (the computation gathers across processes itself: a sharded rollout, a
reference pass through a prepared DataLoader); the main process writes it, all processes wait at a
barrier, and the others read what the main process wrote (or keep their collective result).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")
KEY_SUFFIX = ".key.json"


# ------------------------------------------------------------------------------------ fingerprints


def canonical_json(value: Any) -> str:
    """The canonical JSON text of a value: sorted keys, no ASCII escaping, non-JSON values as ``str``."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def fingerprint(key: Mapping) -> str:
    """A 20-hex-digit SHA-256 of a key's canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:20]


def json_digest(values: Sequence) -> str:
    """A 16-hex-digit SHA-256 of a sequence of JSON values in order (prompts, problems, token ids)."""
    h = hashlib.sha256()
    for value in values:
        h.update(canonical_json(value).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def weights_digest(model: torch.nn.Module, *, exclude: Sequence[str] = ("lora_",)) -> str:
    """A digest of EVERY parameter of a model: per parameter its name, shape, L2 norm and the sum of a strided
    subsample (values rounded to 7 significant digits, so the same weights on another device or in another
    process give the same digest). Parameters whose name contains an ``exclude`` string (LoRA weights by
    default: the reference of a LoRA run is its base; pass ``exclude=()`` to cover them) are skipped, as are
    empty shards (DeepSpeed ZeRO-3 keeps parameters partitioned; there the names and shapes stand for the
    weights). Names are taken without peft's wrapper prefixes, so a base model and the same base under an
    adapter agree."""
    import torch

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


def model_key(model: torch.nn.Module, *, exclude: Sequence[str] = ("lora_",)) -> dict:
    """``{"model": name or path, "weights": full weights digest}``: how a model enters a cache key."""
    return {"model": model_identity(model), "weights": weights_digest(model, exclude=exclude)}


# ------------------------------------------------------------------------------------ processes


def on_main_process(compute: Callable[[], T]) -> T:
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


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


# ------------------------------------------------------------------------------------ files


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary file next to ``path``, flushed to disk, then renamed to ``path``
    (atomic on POSIX): a crash never leaves a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(value, path: str | os.PathLike) -> Path:
    """``value`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(rows, path: str | os.PathLike) -> Path:
    """One JSON object per line, atomically."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def read_jsonl(path: str | os.PathLike) -> list:
    from alignkit.data.loading import read_json_lines

    return [row for _, row in read_json_lines(path)]


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_torch(value, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(value, tmp))


def read_torch(path: str | os.PathLike):
    import torch

    return torch.load(path)


# ------------------------------------------------------------------------------------ entries


@dataclass
class CacheEntry:
    """One cached value at ``path``, valid for ``key`` (stored next to it in ``<path>.key.json``)."""

    path: Path
    key: dict

    def __post_init__(self):
        self.path = Path(self.path)

    @classmethod
    def named(cls, directory: str | os.PathLike, name: str, key: dict, suffix: str) -> CacheEntry:
        """The entry ``<directory>/<name>-<fingerprint(key)><suffix>``: one file per key."""
        return cls(Path(directory) / f"{name}-{fingerprint(key)}{suffix}", dict(key))

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name + KEY_SUFFIX)

    def stored(self) -> dict | None:
        """What the key file holds (``{"key": ..., **extra}``), or ``None`` without one."""
        if not self.key_path.exists():
            return None
        try:
            return read_json(self.key_path)
        except (OSError, json.JSONDecodeError):
            return None

    def matches(self, same: Callable[[dict, dict], bool] | None = None) -> bool:
        """The value and its key file exist, and the stored key is this entry's (``same(stored, key)``
        decides instead of equality when given)."""
        if not self.path.exists():
            return False
        stored = self.stored()
        if stored is None or "key" not in stored:
            return False
        if same is not None:
            return bool(same(stored["key"], self.key))
        return canonical_json(stored["key"]) == canonical_json(self.key)

    def store(self, value, write: Callable[[Any, Path], Any], extra: dict | None = None) -> Path:
        """Write ``value`` with ``write(value, path)`` (an atomic writer) and then the key file."""
        if self.key_path.exists():
            self.key_path.unlink()  # a crash below leaves no key, so the old key never vouches for a new value
        write(value, self.path)
        write_json({"key": self.key, **(extra or {})}, self.key_path)
        return self.path


def cached(
    entry: CacheEntry,
    compute: Callable[[], T],
    *,
    read: Callable[[Path], T],
    write: Callable[[T, Path], Any],
    collective: bool = False,
    same: Callable[[dict, dict], bool] | None = None,
    extra: Callable[[], dict] | None = None,
    what: str = "cache",
) -> T:
    """The value of ``entry``: read on a hit, else ``compute()`` and store (see the module docstring for
    who computes, writes and reads). ``extra()`` adds fields to the key file (a build report, say)."""
    hit = on_main_process(lambda: entry.matches(same))
    if hit:
        logger.info("%s: reusing %s", what, entry.path)
        return read(entry.path)
    main = is_main_process()
    if collective or main:
        value = compute()
    if main:
        entry.store(value, write, extra() if extra is not None else None)
        logger.info("%s: stored %s", what, entry.path)
    wait_for_everyone()
    if collective or main:
        return value
    return read(entry.path)
