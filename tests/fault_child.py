"""The child processes of ``tests/test_fault_injection.py``: ``alignkit train`` on a tiny model, killed
with SIGKILL at a chosen point of one checkpoint save, or paused so that a second run can meet it.

Each child is forked from a multiprocessing forkserver that imported torch, transformers and alignkit
once (a fresh interpreter per child would spend most of the test's time importing). The hooks patch
the real code paths in the child only; the kill is ``os.kill(os.getpid(), SIGKILL)``, so nothing of the
child's own clean-up runs, as with a power cut, the OOM killer or ``kill -9``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

# Points of a save where the child is killed. Trainer._save_checkpoint writes, in this order: weights
# (save_model), optimizer and scheduler, RNG state, trainer_state.json; then alignkit's mixin writes the
# manifest, renames the staging directory into place and deletes checkpoints over save_total_limit.
KILL_POINTS = (
    "before_weights",        # the staging directory exists, nothing in it yet
    "mid_weights",           # model.safetensors half written
    "after_weights",
    "mid_optimizer",         # optimizer.pt half written
    "after_optimizer",       # optimizer.pt and scheduler.pt written
    "after_rng",
    "before_trainer_state",
    "mid_trainer_state",     # trainer_state.json half written
    "after_trainer_state",
    "before_manifest",
    "before_rename",         # manifest written, the directory not yet in place
    "mid_rename",            # an existing checkpoint-N moved aside, the new one not yet renamed in
    "after_rename",          # in place; parent directory not yet flushed, staging root not yet removed
    "mid_rotation",          # an old checkpoint renamed aside and half deleted
)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def install(point: str, step: int) -> None:
    """Patch the save path so that this process kills itself at ``point`` of the save of ``step``."""
    from transformers import Trainer, TrainerState

    import alignkit.checkpoints as checkpoints
    import alignkit.trainers.checkpointing as mixin

    name = f"checkpoint-{step}"

    def at_step(trainer) -> bool:
        return trainer.state.global_step == step

    if point in ("before_weights", "mid_weights", "after_weights"):
        original = Trainer.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            if _internal_call and at_step(self) and point == "before_weights":
                _die()
            original(self, output_dir, _internal_call)
            if _internal_call and at_step(self):
                if point == "mid_weights":
                    _truncate_half(Path(output_dir) / "model.safetensors")
                _die()

        Trainer.save_model = save_model
    elif point in ("mid_optimizer", "after_optimizer"):
        original = Trainer._save_optimizer_and_scheduler

        def save_optimizer(self, output_dir):
            original(self, output_dir)
            if at_step(self):
                if point == "mid_optimizer":
                    _truncate_half(Path(output_dir) / "optimizer.pt")
                _die()

        Trainer._save_optimizer_and_scheduler = save_optimizer
    elif point == "after_rng":
        original = Trainer._save_rng_state

        def save_rng(self, output_dir):
            original(self, output_dir)
            if at_step(self):
                _die()

        Trainer._save_rng_state = save_rng
    elif point in ("before_trainer_state", "mid_trainer_state", "after_trainer_state"):
        original = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if self.global_step == step and name in json_path and point == "before_trainer_state":
                _die()
            original(self, json_path)
            if self.global_step == step and name in json_path:
                if point == "mid_trainer_state":
                    _truncate_half(Path(json_path))
                _die()

        TrainerState.save_to_json = save_to_json
    elif point in ("before_manifest", "before_rename"):
        original = mixin.write_manifest

        def write_manifest(directory, at):
            if at == step and point == "before_manifest":
                _die()
            original(directory, at)
            if at == step:
                _die()

        mixin.write_manifest = write_manifest
    elif point in ("mid_rename", "after_rename"):
        rename = os.rename

        def patched_rename(src, dst, *a, **k):
            rename(src, dst, *a, **k)
            if point == "mid_rename" and Path(src).name == name and Path(dst).name.startswith(".trash-"):
                _die()  # the old checkpoint-N is aside, the new one not yet in place
            if point == "after_rename" and Path(dst).name == name:
                _die()

        os.rename = patched_rename
    elif point == "mid_rotation":
        rmtree = shutil.rmtree

        def patched_rmtree(path, *a, **k):
            files = sorted(Path(path).glob("*"))
            if Path(path).name.startswith(".trash-checkpoint-") and files:
                for f in files[: len(files) // 2]:
                    f.unlink()
                _die()
            rmtree(path, *a, **k)

        checkpoints.shutil.rmtree = patched_rmtree
    else:
        raise ValueError(f"unknown kill point {point!r}")


def pause_after_first_checkpoint(go_file: str, timeout: float = 120.0) -> None:
    """Make the run wait after its first checkpoint until ``go_file`` exists (it holds its lock)."""
    from transformers import Trainer, TrainerCallback

    class Pause(TrainerCallback):
        def on_save(self, args, state, control, **kw):  # checkpoint-1 is in place
            if state.global_step == 1:
                deadline = time.monotonic() + timeout
                while not os.path.exists(go_file) and time.monotonic() < deadline:
                    time.sleep(0.05)

    original = Trainer.__init__

    def init(self, *a, **k):
        original(self, *a, **k)
        self.add_callback(Pause())

    Trainer.__init__ = init


def run(argv: list[str], log_path: str, point: str | None = None, step: int | None = None,
        go_file: str | None = None) -> None:
    """The child: ``alignkit <argv>`` with its output in ``log_path``; exits with the command's code."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    if point is not None:
        install(point, step)
    if go_file is not None:
        pause_after_first_checkpoint(go_file)
    from alignkit.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
