"""One writer per output directory, and an output directory checked before training starts.

**The lock.** A run holds ``OUTPUT_DIR/.alignkit.lock``: an exclusive ``flock`` on the file, whose
content names the holder (host, pid, start time, command). A second run into the same directory is
refused with :class:`OutputDirLocked` naming that holder. The kernel drops a ``flock`` when its process
dies, however it dies, so a lock file left by a killed run is recognised as stale (the file is there,
nobody holds it) and taken over, with a warning naming the run that left it. A clean exit deletes the
file. The lock is re-entrant within a process (the ``alignkit train`` command and the trainer both take
it), not inherited by forked workers (a DataLoader or verifier worker left behind by a killed run does
not keep its lock), and with several processes only the main one takes it: :func:`main_process_decides` runs the check
there and hands its outcome (or its error) to the others, so none of them waits at a collective while
the main process has stopped. ``flock`` works on local file systems and on NFS (Linux emulates it with
byte-range locks there).

**Preflight.** :func:`preflight_output_dir` checks, before any training, that the directory can be
written (a small file is written, flushed and deleted) and that it has room for one checkpoint, as
:func:`checkpoint_size` estimates it from the model and optimizer: weights (every parameter, or only
the trainable ones for a PEFT adapter) at their dtype, plus the optimizer state of the trainable
parameters (Adam/AdamW: two fp32 tensors per parameter), plus the scheduler, RNG and trainer state and
the tokenizer files. Either failure is :class:`OutputDirUnusable` with one line that says what to do.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, with a warning
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".alignkit.lock"
_MIB = 1024 * 1024


class OutputDirError(RuntimeError):
    """An output directory that this run cannot use; the message says why in one line."""


class OutputDirLocked(OutputDirError):
    """Another run holds the output directory."""


class OutputDirUnusable(OutputDirError):
    """The output directory cannot be written, or has no room for a checkpoint."""


def _os_problem(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk is full (No space left on device)"
    if error.errno == errno.EROFS:
        return "it is on a read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return error.strerror or str(error)


def _unusable(directory, error: OSError) -> OutputDirUnusable:
    return OutputDirUnusable(f"output_dir {directory} cannot be written: {_os_problem(error)}")


# ------------------------------------------------------------------------------------ the lock


def _holder_info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]),
    }


def describe_holder(info: dict | None) -> str:
    if not info:
        return "an unknown run (the lock file is empty)"
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')}, "
            f"command: {info.get('command', '?')}")


def _read_info(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 65536, 0)
        info = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class _Held:
    def __init__(self, fd: int, path: Path):
        self.fd, self.path, self.count, self.owner = fd, path, 1, os.getpid()


_HELD: dict[str, _Held] = {}


def _key(directory: Path) -> str:
    return os.path.realpath(directory)


def acquire_output_dir(directory: str | os.PathLike) -> bool:
    """Take (or, re-entrantly, take again) the lock of ``directory``, created if missing; ``True`` when a
    hold was taken, which :func:`release_output_dir` gives back (``False`` only where the platform has no
    file locks). :class:`OutputDirLocked` when another live run holds it, :class:`OutputDirUnusable` when
    the directory cannot be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unusable(directory, e) from None
    key = _key(directory)
    held = _HELD.get(key)
    if held is not None and held.owner == os.getpid():
        held.count += 1
        return True
    if fcntl is None:
        logger.warning("no file locking on this platform: %s is not protected against a second run", directory)
        return False
    path = directory / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise _unusable(directory, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a file system without locks (some FUSE mounts)
                os.close(fd)
                logger.warning("output_dir %s: cannot lock %s (%s); this run is not protected against a second "
                               "one", directory, path, e.strerror or e)
                return False
            info = _read_info(fd)
            os.close(fd)
            gone = ""
            if info and info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
                gone = " (that process has exited, but a process it started still holds the lock)"
            raise OutputDirLocked(
                f"output_dir {directory} is in use by another run: {describe_holder(info)}{gone}; wait for it to "
                f"finish or choose another output_dir (lock file {path})"
            ) from None
        try:  # the file may have been deleted by its last holder between our open and our flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_info(fd)
    if previous:
        logger.warning("output_dir %s: taking over the lock left by a run that is gone (%s)", directory,
                       describe_holder(previous))
    try:
        data = (json.dumps(_holder_info()) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise _unusable(directory, e) from None
    _HELD[key] = _Held(fd, path)
    return True


def release_output_dir(directory: str | os.PathLike) -> None:
    """Give back one hold of ``directory``'s lock; the last one deletes the lock file and unlocks it."""
    key = _key(Path(directory))
    held = _HELD.get(key)
    if held is None or held.owner != os.getpid():
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[key]
    try:
        held.path.unlink(missing_ok=True)  # while still locked: a waiting run then opens a fresh file
    except OSError:
        pass
    os.close(held.fd)


def holds_output_dir(directory: str | os.PathLike) -> bool:
    held = _HELD.get(_key(Path(directory)))
    return held is not None and held.owner == os.getpid()


def _forget_in_child() -> None:
    """A forked child (a DataLoader or verifier worker) must not keep the lock alive after its parent dies:
    drop its copies of the lock descriptors (the parent's lock is unaffected)."""
    for key, held in list(_HELD.items()):
        if held.owner != os.getpid():
            try:
                os.close(held.fd)
            except OSError:
                pass
            del _HELD[key]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _release_all() -> None:
    for key, held in list(_HELD.items()):
        if held.owner == os.getpid():
            held.count = 1
            release_output_dir(key)


# ------------------------------------------------------------------------------------ several processes


def main_process_decides(fn, *, is_main: bool, num_processes: int):
    """``fn()`` on the main process only; every process returns its result or raises its error.

    With one process this is ``fn()``. With several (``torch.distributed`` initialised), the main
    process's outcome is broadcast so that a refusal stops every process at once.
    """
    if num_processes <= 1:
        return fn()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn() if is_main else None
    box = [None]
    if is_main:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    outcome, value = box[0]
    if outcome == "error":
        if is_main:
            raise value
        raise type(value)(str(value)) if isinstance(value, OutputDirError) else OutputDirError(str(value))
    return value


@contextmanager
def locked_output_dir(directory: str | os.PathLike, *, is_main: bool = True, num_processes: int = 1):
    """Hold ``directory``'s lock for the ``with`` block (main process only; see :func:`main_process_decides`)."""
    acquired = main_process_decides(lambda: acquire_output_dir(directory), is_main=is_main,
                                    num_processes=num_processes)
    try:
        yield
    finally:
        if is_main and acquired:
            release_output_dir(directory)


# ------------------------------------------------------------------------------------ preflight


# bytes of optimizer state per trainable parameter, by TrainingArguments.optim name (substring match,
# first hit): Adam and AdamW keep exp_avg and exp_avg_sq in fp32 (Kingma & Ba 2015; torch.optim.AdamW)
_OPTIMIZER_STATE_BYTES = (
    ("8bit", 2), ("adafactor", 0), ("sgd", 4), ("adagrad", 4), ("lion", 4), ("rmsprop", 4), ("lomo", 0),
    ("adam", 8),
)
_DEFAULT_STATE_BYTES = 8
_SMALL_STATE_BYTES = 1 * _MIB  # scheduler, RNG state, trainer_state.json, model config, manifest


@dataclass
class CheckpointSize:
    """An estimate of one checkpoint's bytes, by part."""

    weights: int
    optimizer: int
    tokenizer: int
    other: int = _SMALL_STATE_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.tokenizer + self.other

    def describe(self) -> str:
        return (f"weights {_mb(self.weights)} + optimizer state {_mb(self.optimizer)} + tokenizer "
                f"{_mb(self.tokenizer)} + scheduler/RNG/trainer state {_mb(self.other)}")


def _mb(n: int) -> str:
    return f"{n / _MIB:.1f} MB"


def _unique_parameters(model):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def optimizer_state_bytes(optim_name: str) -> int:
    name = str(getattr(optim_name, "value", optim_name)).lower()
    return next((b for key, b in _OPTIMIZER_STATE_BYTES if key in name), _DEFAULT_STATE_BYTES)


def _tokenizer_bytes(tokenizer) -> int:
    """The size of the tokenizer files a checkpoint copies (from where the tokenizer was loaded)."""
    if tokenizer is None:
        return 0
    source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if source.is_dir():
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                 "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")
        return sum((source / n).stat().st_size for n in names if (source / n).is_file())
    return 4 * _MIB


def checkpoint_size(model, *, optim: str = "adamw_torch", save_only_model: bool = False,
                    tokenizer=None) -> CheckpointSize:
    """Bytes one ``Trainer`` checkpoint of ``model`` takes: parameter count × dtype size for the weights
    (only the trainable ones for a PEFT model, whose checkpoint holds the adapter), plus the optimizer
    state of the trainable parameters, plus the tokenizer files and a megabyte of small state."""
    is_adapter = hasattr(model, "peft_config")
    weights = trainable = 0
    for p in _unique_parameters(model):
        nbytes = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
        if p.requires_grad or not is_adapter:
            weights += nbytes
    optimizer = 0 if save_only_model else trainable * optimizer_state_bytes(optim)
    return CheckpointSize(weights=weights, optimizer=optimizer, tokenizer=_tokenizer_bytes(tokenizer))


def check_writable(directory: str | os.PathLike) -> None:
    """Write, flush and delete a small file in ``directory``; :class:`OutputDirUnusable` if that fails."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".alignkit-write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise _unusable(directory, e) from None


def preflight_output_dir(directory: str | os.PathLike, need: CheckpointSize | None = None, *,
                         final_model_bytes: int = 0) -> None:
    """Fail before training when ``directory`` cannot be written or has less free space than ``need``
    (one checkpoint) plus ``final_model_bytes`` (the model saved at the end)."""
    check_writable(directory)
    if need is None:
        return
    required = need.total + final_model_bytes
    free = shutil.disk_usage(directory).free
    logger.info("output_dir %s: %s free; one checkpoint needs about %s (%s)", directory, _mb(free),
                _mb(need.total), need.describe())
    if free < required:
        final = f" and the final model {_mb(final_model_bytes)}" if final_model_bytes else ""
        raise OutputDirUnusable(
            f"output_dir {directory} has {_mb(free)} free, but one checkpoint needs about {_mb(need.total)} "
            f"({need.describe()}){final}; free some space or choose another output_dir"
        )
