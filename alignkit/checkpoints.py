"""Checkpoints that are complete or absent, and the newest complete one to resume from.

A ``transformers.Trainer`` checkpoint is a directory ``OUTPUT_DIR/checkpoint-N`` written file by file:
weights, optimizer, scheduler, RNG state, then ``trainer_state.json``. A process killed in the middle
leaves a directory that looks like a checkpoint and is not one, and ``get_last_checkpoint`` picks it by
its number alone. Here a checkpoint is written elsewhere and appears whole:

1. every file goes into a staging directory ``OUTPUT_DIR/.tmp-checkpoint-N/checkpoint-N``;
2. each file is flushed to disk (``fsync``) and a manifest (:data:`MANIFEST_NAME`: every file with its
   size) is written last, itself atomically;
3. one ``rename`` puts the directory in place (atomic on POSIX file systems), and the parent directory is
   flushed; a checkpoint that is replaced or deleted is first renamed aside (``.trash-...``), so no
   half-deleted ``checkpoint-N`` is ever visible either.

A kill at any moment leaves either the previous checkpoints or the new complete one, plus staging or
trash directories that :func:`remove_leftovers` clears at the next start. The same idea as
``torch.distributed.checkpoint``'s ``.metadata`` written last and orbax's atomic rename of a temporary
checkpoint directory.

:func:`checkpoint_problems` says why a directory is not a complete checkpoint: a missing or mismatched
manifest entry (a truncated file), a ``.safetensors`` file whose header and length disagree, a torch
``.pt``/``.pth``/``.bin`` file whose zip directory is unreadable, JSON that does not parse. Checkpoints
written before manifests existed (by an older alignkit or plain ``transformers``) are accepted when
``trainer_state.json``, which ``Trainer`` writes last, is there and every file is whole.
:func:`newest_complete_checkpoint` is the ``auto`` resume: the highest step that is complete, logging
each newer one it skipped and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile
from pathlib import Path

from alignkit.cache import atomic_write_text

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
MANIFEST_NAME = "alignkit_checkpoint.json"
STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_FORMAT = 1
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")
_WEIGHT_FILES = (
    "model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "adapter_model.bin", "pytorch_model.bin.index.json",
)
_RESUME_WORDS = ("auto", "true", "last")
_NO_RESUME_WORDS = ("false", "none", "")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message names it and says why."""


# ------------------------------------------------------------------------------------ durable writes


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's data and metadata to disk (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def write_manifest(checkpoint_dir: str | os.PathLike, step: int | None = None) -> dict:
    """Flush every file of ``checkpoint_dir`` to disk, then write the manifest (each file's size) last."""
    directory = Path(checkpoint_dir)
    files = {}
    for path in _files(directory):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        fsync_path(path)
        files[rel] = path.stat().st_size
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        fsync_path(sub)
    manifest = {"format": MANIFEST_FORMAT, "step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": files}
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    fsync_path(directory)
    return manifest


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory so that it is never seen half-deleted under its name: rename it aside first."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def commit_directory(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put ``staged`` in place as ``final`` with one rename (an existing ``final`` is renamed aside first
    and deleted after)."""
    staged, final = Path(staged), Path(final)
    aside = None
    if final.exists():
        aside = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, aside)
    os.rename(staged, final)
    fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into ``output_dir``: a hidden directory
    that neither ``get_last_checkpoint`` nor ``sort_checkpoints`` (``checkpoint-*``) sees."""
    return Path(output_dir) / f"{STAGING_PREFIX}{PREFIX}-{step}"


def remove_leftovers(output_dir: str | os.PathLike) -> list[str]:
    """Delete staging and trash directories left by a run that was killed; returns their names."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if path.is_dir() and (path.name.startswith(f"{STAGING_PREFIX}{PREFIX}-")
                              or path.name.startswith(f"{TRASH_PREFIX}{PREFIX}-")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        logger.info("%s: removed %d unfinished checkpoint write(s) left by an earlier run: %s", directory,
                    len(removed), ", ".join(sorted(removed)))
    return removed


# ------------------------------------------------------------------------------------ validation


def _safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is not whole: its 8-byte header length, JSON header and the end of
    the last tensor's data must agree with the file size (the format: huggingface/safetensors README)."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name}: {size} bytes, shorter than a safetensors header"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"{path.name}: truncated ({size} bytes; the header alone needs {8 + header_len})"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name}: unreadable safetensors header"
    if not isinstance(header, dict):
        return f"{path.name}: unreadable safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name}: {size} bytes, its header describes {expected} (truncated or padded)"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file is not whole: since torch 1.6 it is a zip archive whose central
    directory sits at the end, so a truncated file has none."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # the legacy pickle format: nothing cheap to check but its presence
        return None if path.stat().st_size > 0 else f"{path.name}: empty"
    try:
        with zipfile.ZipFile(path) as archive:
            end = max((i.header_offset + i.compress_size for i in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"{path.name}: truncated or corrupt ({e})"
    if end > path.stat().st_size:
        return f"{path.name}: truncated (its records run past the end of the file)"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path.name}: not valid JSON ({e}; truncated?)"
    return None


def _file_problem(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors_problem(path)
    if suffix in (".pt", ".pth", ".bin"):
        return _torch_file_problem(path)
    if suffix == ".json":
        return _json_problem(path)
    return None


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """Why ``path`` is not a complete checkpoint (an empty list when it is one)."""
    directory = Path(path)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    manifest_path = directory / MANIFEST_NAME
    problems = []
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = manifest["files"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return [f"{MANIFEST_NAME} is unreadable"]
        for rel, size in files.items():
            file = directory / rel
            if not file.is_file():
                problems.append(f"{rel} is missing")
            elif file.stat().st_size != size:
                problems.append(f"{rel} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)")
        if problems:
            return problems
        names = set(files)
    else:  # written without a manifest: trainer_state.json comes last in Trainer._save_checkpoint
        names = {p.relative_to(directory).as_posix() for p in _files(directory)}
        if TRAINER_STATE_NAME not in names:
            return [f"no {MANIFEST_NAME} and no {TRAINER_STATE_NAME}: the save did not finish"]
    if TRAINER_STATE_NAME not in names:
        problems.append(f"{TRAINER_STATE_NAME} is missing")
    if not any(name in names for name in _WEIGHT_FILES) and not (directory / "latest").exists() \
            and not any(n.startswith("pytorch_model_fsdp") for n in names):
        problems.append("no model weights")
    for rel in sorted(names):
        problem = _file_problem(directory / rel)
        if problem is not None:
            problems.append(problem)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in names and not problems:
            weight_map = json.loads((directory / index_name).read_text()).get("weight_map", {})
            problems += [f"{shard} (listed in {index_name}) is missing" for shard in sorted(set(weight_map.values()))
                         if not (directory / shard).is_file()]
    if not problems:
        state = json.loads((directory / TRAINER_STATE_NAME).read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            problems.append(f"{TRAINER_STATE_NAME} has no global_step")
    return problems


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return not checkpoint_problems(path)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, highest step first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """The complete checkpoint with the highest step in ``output_dir`` (or ``None``), and the newer
    ``(name, reason)`` it skipped; each skip is logged as a warning."""
    skipped = []
    for _, path in checkpoint_dirs(output_dir):
        problems = checkpoint_problems(path)
        if not problems:
            for name, reason in skipped:
                logger.warning("resume: skipped %s: %s", name, reason)
            logger.info("resume: from %s", path)
            return str(path), skipped
        skipped.append((path.name, "; ".join(problems)))
    for name, reason in skipped:
        logger.warning("resume: skipped %s: %s", name, reason)
    return None, skipped


def resolve_resume_checkpoint(value, output_dir: str | os.PathLike, *, require: bool = False) -> str | None:
    """The checkpoint to resume from for a ``resume_from_checkpoint`` value.

    ``None``/``False``/``"none"``/``"false"``: none. ``True``/``"auto"``/``"true"``/``"last"``: the newest
    complete checkpoint in ``output_dir`` (``None`` when there is none, or :class:`CheckpointError` with
    ``require``, as ``Trainer.train(resume_from_checkpoint=True)`` does). A path: that checkpoint, which
    must be complete (:class:`CheckpointError` saying why not).
    """
    if value is None or value is False or str(value).strip().lower() in _NO_RESUME_WORDS:
        return None
    if value is True or str(value).strip().lower() in _RESUME_WORDS:
        path, skipped = newest_complete_checkpoint(output_dir)
        if path is None:
            detail = "; ".join(f"{name}: {reason}" for name, reason in skipped)
            if require:
                raise CheckpointError(f"no complete checkpoint in {output_dir}" + (f" ({detail})" if detail else ""))
            logger.info("resume: no complete checkpoint in %s%s; starting from the beginning", output_dir,
                        f" (skipped {detail})" if detail else "")
        return path
    problems = checkpoint_problems(value)
    if problems:
        raise CheckpointError(f"cannot resume from {value}: not a complete checkpoint ({'; '.join(problems)}); "
                              "use --resume_from_checkpoint auto for the newest complete one")
    return str(value)
