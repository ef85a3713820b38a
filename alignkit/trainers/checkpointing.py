"""``CheckpointingMixin``: a ``transformers.Trainer`` whose checkpoints are complete or absent, that
resumes from the newest complete one, holds its output directory, and checks it before training.

Mixed in before ``Trainer`` (``class AlignTrainer(CheckpointingMixin, Trainer)``), it changes five things:

* ``_save_checkpoint``: ``Trainer`` writes the checkpoint into a staging directory
  (``_get_output_dir`` points there during the save); the main process then adds the files registered
  with :meth:`~CheckpointingMixin.add_checkpoint_writer`, writes the manifest last and renames the
  directory into place (:mod:`alignkit.checkpoints`), then deletes checkpoints beyond
  ``save_total_limit``, complete ones only and each renamed aside first. ``Trainer``'s own rotation runs
  inside the staging directory, where it has nothing to delete. A save that fails (a full disk) removes
  its staging directory and raises :class:`~alignkit.checkpoints.CheckpointError` naming the newest
  complete checkpoint.
* ``save_model``: every saved model or adapter (the final one and each checkpoint's) gets a model card,
  ``README.md`` (:mod:`alignkit.model_card`), written after peft's blank template, which it replaces.
* ``train``: ``resume_from_checkpoint=True`` / ``"auto"`` takes the newest *complete* checkpoint (skipped
  ones are logged with the reason), an explicit path must be complete; before anything else the main
  process takes the output directory's lock (:mod:`alignkit.output_dir`; released when ``train``
  returns, unless the caller held it already), removes staging and trash directories a killed run left,
  and checks that the directory is writable with room for a checkpoint. A refusal is raised on every
  process.

Upstream behaviour being replaced: ``Trainer._save_checkpoint`` and ``transformers.trainer_utils``'s
``get_last_checkpoint`` / ``rotate_checkpoints`` (transformers 5.24) write in place and pick the highest
step without checking it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alignkit.checkpoints import (
    TRAINER_STATE_NAME,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_problems,
    commit_directory,
    newest_complete_checkpoint,
    remove_leftovers,
    remove_tree,
    resolve_resume_checkpoint,
    staging_dir,
    write_manifest,
)
from alignkit.output_dir import (
    OutputDirError,
    acquire_output_dir,
    checkpoint_size,
    main_process_decides,
    preflight_output_dir,
    release_output_dir,
)

logger = logging.getLogger(__name__)


def _write_problem(directory) -> str | None:
    """Why ``directory`` cannot take more data (full, read-only, gone), or ``None`` when it still can:
    a save that failed for another reason is a bug, not a disk problem."""
    probe = Path(directory) / ".alignkit-write-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


class CheckpointingMixin:
    """Complete-or-absent checkpoints, ``auto`` resume, output-dir lock and preflight for a ``Trainer``
    (see the module docstring). Put it before ``transformers.Trainer`` in the bases."""

    _checkpoint_staging_root: str | None = None

    def add_checkpoint_writer(self, writer: Callable[[str], None]) -> None:
        """Call ``writer(checkpoint_dir)`` on the main process during every checkpoint save, after
        ``Trainer`` wrote its files and before the manifest: what it writes is part of the checkpoint
        (complete or absent with it). ``checkpoint_dir`` is the staging directory, not the final one."""
        writers = self.__dict__.setdefault("_checkpoint_writers", [])
        writers.append(writer)

    # ------------------------------------------------------------------------------------ saving

    def __init__(self, *args, **kwargs):
        # the datasets as given (paths, hub ids, loaded records), for the model card; the trainer replaces them
        from alignkit.model_card import describe_source

        self._card_sources = {"train": describe_source(kwargs.get("train_dataset")),
                              "eval": describe_source(kwargs.get("eval_dataset"))}
        super().__init__(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, then the model card (:mod:`alignkit.model_card`) on the main process,
        replacing the blank template peft writes next to an adapter. A card that cannot be built is a
        warning: it never fails the save."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            from alignkit.model_card import write_model_card

            try:
                write_model_card(self, output_dir or self.args.output_dir)
            except Exception as e:  # noqa: BLE001 - the weights are saved; the card is documentation
                logger.warning("no model card written to %s: %s: %s", output_dir or self.args.output_dir,
                               type(e).__name__, e)

    def _get_output_dir(self, trial) -> str:
        staging = self._checkpoint_staging_root
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        step = self.state.global_step
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging_root = staging_dir(run_dir, step)
        staged, final = staging_root / name, Path(run_dir) / name
        should_save = self.args.should_save
        if should_save:
            remove_tree(staging_root)
            os.makedirs(staging_root, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process wrote its part (RNG state, shards)
            if should_save:
                self._point_best_checkpoint_at(run_dir, str(staging_root), staged)
                for writer in self.__dict__.get("_checkpoint_writers", ()):
                    writer(str(staged))
                write_manifest(staged, step)
                commit_directory(staged, final)
                os.rmdir(staging_root)
                self._rotate_complete_checkpoints(run_dir, final)
        except BaseException as e:
            # torch.save reports a full disk as a RuntimeError: ask the directory itself what is wrong
            problem = _write_problem(staging_root) if should_save and isinstance(e, Exception) else None
            if should_save:
                remove_tree(staging_root)
            if problem is None:
                raise
            newest, _ = newest_complete_checkpoint(run_dir)
            raise CheckpointError(
                f"could not write {name} in {run_dir}: {problem}; the newest complete checkpoint is "
                f"{Path(newest).name if newest else 'none'}. Fix the directory (free space?) and rerun with "
                "--resume_from_checkpoint auto"
            ) from e
        finally:
            self._checkpoint_staging_root = None
        self.accelerator.wait_for_everyone()  # nobody reads or writes checkpoints before the rename

    def _point_best_checkpoint_at(self, run_dir: str, staging_root: str, staged: Path) -> None:
        """``Trainer`` looked for the best checkpoint in the staging directory: point it at the final one
        (and rewrite the staged ``trainer_state.json`` that recorded it)."""
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == Path(staging_root):
            self.state.best_model_checkpoint = str(Path(run_dir) / Path(best).name)
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def _rotate_complete_checkpoints(self, run_dir: str, newest: Path) -> None:
        """Keep at most ``save_total_limit`` complete checkpoints: the newest and the best always, then by
        step. Incomplete directories are neither counted nor deleted (only reported at resume)."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        best = self.state.best_model_checkpoint
        protected = {newest.resolve()} | ({Path(best).resolve()} if best else set())
        complete = [path for _, path in checkpoint_dirs(run_dir) if not checkpoint_problems(path)]
        keep = max(limit, len(protected & {p.resolve() for p in complete}))
        kept = sum(p.resolve() in protected for p in complete)
        for path in complete:  # highest step first
            if path.resolve() in protected:
                continue
            if kept < keep:
                kept += 1
                continue
            logger.info("deleting older checkpoint %s (save_total_limit=%d)", path, limit)
            remove_tree(path)

    # ------------------------------------------------------------------------------------ training

    def _prepare_output_dir(self, resume_from_checkpoint) -> tuple[str | None, bool]:
        """On the main process: lock, clear leftovers, pick the checkpoint, check room. ``(resume, acquired)``."""
        args = self.args
        acquired = acquire_output_dir(args.output_dir)
        try:
            remove_leftovers(args.output_dir)
            resume = resolve_resume_checkpoint(resume_from_checkpoint, args.output_dir,
                                               require=resume_from_checkpoint is True)
            saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
            size = checkpoint_size(self.model, optim=args.optim, save_only_model=args.save_only_model,
                                   tokenizer=self.processing_class)
            if not saves:
                size.optimizer = 0
            preflight_output_dir(args.output_dir, size, final_model_bytes=size.weights if saves else 0)
        except BaseException:
            if acquired:
                release_output_dir(args.output_dir)
            raise
        return resume, acquired

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        is_main = self.args.process_index == 0
        resume, acquired = main_process_decides(
            lambda: self._prepare_output_dir(resume_from_checkpoint), is_main=is_main,
            num_processes=self.args.world_size,
        )
        acquired = acquired and is_main
        try:
            return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                                 **kwargs)
        finally:
            if acquired:
                release_output_dir(self.args.output_dir)


__all__ = ["CheckpointError", "CheckpointingMixin", "OutputDirError"]
