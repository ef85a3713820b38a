"""Fault injection: nothing is lost when a run is killed, shares its output_dir, or has no room.

* ``kill -9`` at every stage of a checkpoint save (``fault_child.KILL_POINTS``), and checkpoint files
  truncated afterwards: no incomplete ``checkpoint-N`` is ever visible, and ``--resume_from_checkpoint
  auto`` reaches final weights bit-identical (``torch.equal``) to an uninterrupted run's;
* two runs into one output_dir: the second is refused naming the first; a lock left by a killed run is
  taken over;
* a read-only and a full output_dir (a size-limited tmpfs, mounted where the machine allows): refused
  before training with one line; a disk that fills up mid-run loses no checkpoint.

The training runs are ``alignkit train`` in children forked from a forkserver that imported torch and
alignkit once (``tests/fault_child.py``), on a 150k-parameter model, 4 steps, a checkpoint every step.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fault_child
from alignkit.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_problems,
    newest_complete_checkpoint,
    remove_leftovers,
    resolve_resume_checkpoint,
    write_manifest,
)
from alignkit.output_dir import (
    LOCK_NAME,
    OutputDirLocked,
    OutputDirUnusable,
    acquire_output_dir,
    check_writable,
    checkpoint_size,
    holds_output_dir,
    preflight_output_dir,
    release_output_dir,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "dpo_tiny.yaml")
MAX_STEPS, KILL_STEP = 4, 3  # a checkpoint every step; most kills hit the save of step 3 (step 2 is complete)
COMMON = ["--max_steps", str(MAX_STEPS), "--save_steps", "1", "--save_total_limit", "2", "--eval_strategy", "no",
          "--synthetic_train_size", "16", "--per_device_train_batch_size", "2", "--logging_steps", "1",
          "--max_length", "96", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
CHILD_TIMEOUT = 600


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fault_child", "torch", "transformers", "alignkit.cli", "alignkit.recipes",
                                "alignkit.trainers", "alignkit.tasks.arithmetic"])
    return ctx


def _child(ctx, argv, log, **kw) -> int:
    proc = ctx.Process(target=fault_child.run, args=(argv, str(log)), kwargs=kw)
    proc.start()
    proc.join(CHILD_TIMEOUT)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"child did not finish in {CHILD_TIMEOUT}s; log:\n{Path(log).read_text()[-3000:]}")
    return proc.exitcode


def _argv(model, out, *extra):
    return ["train", RECIPE, "--model_name_or_path", str(model), "--output_dir", str(out), *COMMON, *extra]


def _log(path) -> str:
    return Path(path).read_text(errors="replace")


def _assert_same_weights(expected: dict, path: Path) -> None:
    got = load_file(path)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def _assert_no_incomplete_checkpoint_visible(out: Path) -> None:
    for _, path in checkpoint_dirs(out):
        assert checkpoint_problems(path) == [], f"{path.name} is visible but incomplete"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from alignkit.modeling import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("fi_model") / "tiny", "qwen2")


@pytest.fixture(scope="module")
def baseline(forkserver, model_dir, tmp_path_factory):
    """The uninterrupted run: its final weights and its directory."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    code = _child(forkserver, _argv(model_dir, out), out.parent / "log.txt")
    assert code == 0, _log(out.parent / "log.txt")[-3000:]
    weights = load_file(out / "model.safetensors")
    start = load_file(Path(model_dir) / "model.safetensors")
    assert any(not torch.equal(weights[k], start[k]) for k in weights), "training did not move the weights"
    return weights, out


@pytest.fixture(scope="module")
def two_complete_checkpoints(forkserver, model_dir, baseline, tmp_path_factory):
    """A run killed at the start of the save of step KILL_STEP + 1: complete checkpoints at KILL_STEP - 1
    and KILL_STEP (save_total_limit 2)."""
    out = tmp_path_factory.mktemp("two") / "run"
    code = _child(forkserver, _argv(model_dir, out), out.parent / "log.txt", point="before_weights",
                  step=KILL_STEP + 1)
    assert code == -signal.SIGKILL, _log(out.parent / "log.txt")[-3000:]
    assert [s for s, _ in checkpoint_dirs(out)] == [KILL_STEP, KILL_STEP - 1]
    return out


def _resume_and_compare(ctx, model_dir, out: Path, expected_from: int, baseline_weights) -> str:
    log = out.parent / "resume_log.txt"
    code = _child(ctx, _argv(model_dir, out, "--resume_from_checkpoint", "auto"), log)
    text = _log(log)
    assert code == 0, text[-4000:]
    assert f"resume: from {out / f'checkpoint-{expected_from}'}" in text, text[-4000:]
    _assert_same_weights(baseline_weights, out / "model.safetensors")
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    _assert_no_incomplete_checkpoint_visible(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert not (out / LOCK_NAME).exists()  # released at exit
    return text


# ------------------------------------------------------------------------------------ kill -9 mid-save


# the checkpoint auto-resume must take after a kill at each point (the new one once it is renamed in)
_RESUMES_FROM = {point: KILL_STEP - 1 for point in fault_child.KILL_POINTS}
_RESUMES_FROM["after_rename"] = KILL_STEP
_RESUMES_FROM["mid_rotation"] = KILL_STEP


@pytest.mark.slow
@pytest.mark.parametrize("point", fault_child.KILL_POINTS)
def test_kill_at_each_stage_of_a_save_then_auto_resume_gives_the_same_weights(
        point, forkserver, model_dir, baseline, two_complete_checkpoints, tmp_path):
    weights, _ = baseline
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    if point == "mid_rename":  # re-saving over an existing complete checkpoint-3: resume explicitly from 2
        shutil.copytree(two_complete_checkpoints, out)
        argv = _argv(model_dir, out, "--resume_from_checkpoint", str(out / f"checkpoint-{KILL_STEP - 1}"))
    else:
        argv = _argv(model_dir, out)
    code = _child(forkserver, argv, log, point=point, step=KILL_STEP)
    assert code == -signal.SIGKILL, f"not killed at {point}:\n{_log(log)[-3000:]}"
    _assert_no_incomplete_checkpoint_visible(out)
    assert (out / LOCK_NAME).exists()  # the killed run's lock, left behind
    newest, _ = newest_complete_checkpoint(out)
    assert Path(newest).name == f"checkpoint-{_RESUMES_FROM[point]}"
    text = _resume_and_compare(forkserver, model_dir, out, _RESUMES_FROM[point], weights)
    assert "taking over the lock left by a run that is gone" in text


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                    "trainer_state.json", "legacy_half_written"])
def test_truncated_checkpoint_files_are_skipped(damage, forkserver, model_dir, baseline, two_complete_checkpoints,
                                                tmp_path):
    """A checkpoint damaged after it was written (a truncated file; or, as plain transformers leaves one,
    weights without trainer_state.json and no manifest) is skipped with its reason; resume takes the one
    before it and still ends bit-identical."""
    weights, _ = baseline
    out = tmp_path / "run"
    shutil.copytree(two_complete_checkpoints, out)
    victim = out / f"checkpoint-{KILL_STEP}"
    if damage == "legacy_half_written":
        (victim / MANIFEST_NAME).unlink()
        (victim / "trainer_state.json").unlink()
        reason = "no alignkit_checkpoint.json and no trainer_state.json"
    else:
        path = victim / damage
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        reason = f"{damage} has"
    text = _resume_and_compare(forkserver, model_dir, out, KILL_STEP - 1, weights)
    assert f"skipped checkpoint-{KILL_STEP}: {reason}" in text


@pytest.mark.slow
def test_explicit_incomplete_checkpoint_is_refused_with_one_line(forkserver, model_dir, two_complete_checkpoints,
                                                                 tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_complete_checkpoints, out)
    victim = out / f"checkpoint-{KILL_STEP}"
    (victim / "optimizer.pt").write_bytes(b"")
    log = tmp_path / "log.txt"
    code = _child(forkserver, _argv(model_dir, out, "--resume_from_checkpoint", str(victim)), log)
    assert code == 2
    last = _log(log).strip().splitlines()[-1]
    assert last.startswith("alignkit train: error: cannot resume from") and "optimizer.pt has 0 bytes" in last


# ------------------------------------------------------------------------------------ one writer per output_dir


@pytest.mark.slow
def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(forkserver, model_dir, tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    first = forkserver.Process(target=fault_child.run, args=(_argv(model_dir, out), str(tmp_path / "a.txt")),
                               kwargs={"go_file": str(go)})
    first.start()
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not (out / "checkpoint-1").exists():  # the first run is training and holds the lock
            assert first.is_alive() and time.monotonic() < deadline, _log(tmp_path / "a.txt")[-3000:]
            time.sleep(0.2)
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid

        start = time.perf_counter()
        code = _child(forkserver, _argv(model_dir, out), tmp_path / "b.txt")
        refused_in = time.perf_counter() - start
        lines = _log(tmp_path / "b.txt").strip().splitlines()
        assert code == 2
        assert lines[-1].startswith(f"alignkit train: error: output_dir {out} is in use by another run: host ")
        assert f"pid {first.pid}, started " in lines[-1] and "command: " in lines[-1]
        assert "Traceback" not in _log(tmp_path / "b.txt")
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # the second run changed nothing

        os.kill(first.pid, signal.SIGKILL)  # the first run dies holding the lock
        first.join()
    finally:
        if first.is_alive():
            first.kill()
            first.join()
    assert (out / LOCK_NAME).exists()
    code = _child(forkserver, _argv(model_dir, out, "--resume_from_checkpoint", "auto"), tmp_path / "c.txt")
    text = _log(tmp_path / "c.txt")
    assert code == 0, text[-3000:]
    assert f"taking over the lock left by a run that is gone (host " in text and f"pid {first.pid}," in text
    assert not (out / LOCK_NAME).exists()
    print(f"second run refused in {refused_in:.1f}s (wall, including its fork)")


_HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from alignkit.output_dir import acquire_output_dir
    acquire_output_dir(sys.argv[1])
    print("held", flush=True)
    if sys.argv[2] == "die":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
""")


def _holder(directory, mode):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_SCRIPT, str(directory), mode], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_its_holder_is_reentrant_and_released(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out, "hold")
    try:
        with pytest.raises(OutputDirLocked) as e:
            acquire_output_dir(out)
        assert f"pid {holder.pid}," in str(e.value) and "is in use by another run" in str(e.value)
        assert str(out / LOCK_NAME) in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    assert acquire_output_dir(out) and acquire_output_dir(out)  # stale lock taken over; then re-entrant
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_output_dir(out)
    assert holds_output_dir(out) and (out / LOCK_NAME).exists()
    release_output_dir(out)
    assert not holds_output_dir(out) and not (out / LOCK_NAME).exists()


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    dead = _holder(out, "die")
    dead.wait()
    assert dead.returncode == -signal.SIGKILL and (out / LOCK_NAME).exists()
    with caplog.at_level("WARNING", logger="alignkit.output_dir"):
        assert acquire_output_dir(out)
    try:
        assert f"taking over the lock left by a run that is gone" in caplog.text
        assert f"pid {dead.pid}," in caplog.text
    finally:
        release_output_dir(out)


_FORK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from alignkit.output_dir import acquire_output_dir
    acquire_output_dir(sys.argv[1])
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # a worker the run started (DataLoader, verifier pool) that outlives it
        os.write(ready_w, b"x")  # the fork handlers have run in this process (on a loaded machine the
        time.sleep(60)           # run could otherwise be killed before the worker was ever scheduled)
        os._exit(0)
    os.read(ready_r, 1)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_worker_left_behind_by_a_killed_run_does_not_keep_its_lock(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _FORK_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    child = int(proc.stdout.readline())
    proc.wait()
    try:
        assert proc.returncode == -signal.SIGKILL and os.path.exists(f"/proc/{child}")  # the worker lives on
        assert acquire_output_dir(out)  # ... and the dead run's lock is free
        release_output_dir(out)
    finally:
        os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------------------------ read-only and full disks


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = Path(f"/tmp/alignkit-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if ok.returncode != 0:
            return f"mount -t tmpfs failed here: {ok.stderr.decode().strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


_MOUNT_PROBLEM = _can_mount() if sys.platform.startswith("linux") else "not Linux"
needs_mount = pytest.mark.skipif(_MOUNT_PROBLEM is not None, reason=str(_MOUNT_PROBLEM))


class _Tmpfs:
    def __init__(self, path: Path, options: str):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


def test_read_only_output_dir_is_refused_before_training(forkserver, model_dir, tmp_path):
    mount = None
    if _MOUNT_PROBLEM is None:
        mount = _Tmpfs(tmp_path / "ro", "ro,size=1m")
        out = mount.path / "run"
    else:  # not root: a directory without write permission does the same for an ordinary user
        if os.geteuid() == 0:
            pytest.skip(f"root ignores permissions and {_MOUNT_PROBLEM}")
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        out = tmp_path / "ro" / "run"
    try:
        code = _child(forkserver, _argv(model_dir, out), tmp_path / "log.txt")
    finally:
        if mount:
            mount.close()
    text = _log(tmp_path / "log.txt")
    assert code == 2 and "Traceback" not in text
    assert text.strip().splitlines()[-1] == f"alignkit train: error: output_dir {out} cannot be written: " + (
        "it is on a read-only file system" if mount else "permission denied")


@needs_mount
def test_full_output_dir_is_refused_before_training_with_the_estimate(forkserver, model_dir, baseline, tmp_path):
    mount = _Tmpfs(tmp_path / "full", "size=512k")
    out = mount.path / "run"
    try:
        start = time.perf_counter()
        code = _child(forkserver, _argv(model_dir, out), tmp_path / "log.txt")
        seconds = time.perf_counter() - start
        leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    finally:
        mount.close()
    text = _log(tmp_path / "log.txt")
    last = text.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert last.startswith(f"alignkit train: error: output_dir {out} has 0.5 MB free, but one checkpoint needs about")
    assert "weights 0.6 MB + optimizer state 1.2 MB" in last and "free some space or choose another output_dir" in last
    assert "'loss'" not in text and leftovers == []  # no step was trained, nothing was left behind
    print(f"full disk refused in {seconds:.1f}s: {last}")


@pytest.mark.slow
@needs_mount
def test_disk_filling_up_mid_run_loses_no_checkpoint(forkserver, model_dir, baseline, tmp_path):
    """Room for the preflight's estimate but not for every checkpoint (save_total_limit none): the save
    that fails is removed, the error names the newest complete checkpoint, and after the disk grows a
    resume ends bit-identical."""
    weights, base_dir = baseline
    checkpoint = sum(p.stat().st_size for p in (base_dir / f"checkpoint-{MAX_STEPS}").iterdir())
    size_kb = (checkpoint * 5 // 2) // 1024  # room for two checkpoints, not three
    mount = _Tmpfs(tmp_path / "disk", f"size={size_kb}k")
    out = mount.path / "run"
    try:
        code = _child(forkserver, _argv(model_dir, out, "--save_total_limit", "0"), tmp_path / "log.txt")
        text = _log(tmp_path / "log.txt")
        assert code == 2 and "Traceback" not in text, text[-3000:]
        assert text.strip().splitlines()[-1] == (
            f"alignkit train: error: could not write checkpoint-3 in {out}: No space left on device; the newest "
            "complete checkpoint is checkpoint-2. Fix the directory (free space?) and rerun with "
            "--resume_from_checkpoint auto")
        assert [s for s, _ in checkpoint_dirs(out)] == [2, 1]
        assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # the failed save is gone
        _assert_no_incomplete_checkpoint_visible(out)
        mount.remount("size=16m")
        _resume_and_compare(forkserver, model_dir, out, 2, weights)
    finally:
        mount.close()


# ------------------------------------------------------------------------------------ the pieces, fast


def _fake_checkpoint(directory: Path, step: int, *, manifest: bool = True) -> Path:
    from safetensors.torch import save_file

    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path / "model.safetensors"))
    torch.save({"state": {0: torch.ones(3)}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if manifest:
        write_manifest(path, step)
    return path


def test_newest_complete_checkpoint_skips_incomplete_ones_and_says_why(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 2)
    legacy = _fake_checkpoint(tmp_path, 4, manifest=False)  # plain transformers: no manifest, complete
    damaged = _fake_checkpoint(tmp_path, 6)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.truncate(60)
    half = tmp_path / "checkpoint-8"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x08")
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: ignored
    with caplog.at_level("INFO", logger="alignkit.checkpoints"):
        path, skipped = newest_complete_checkpoint(tmp_path)
    assert path == str(legacy)
    assert [name for name, _ in skipped] == ["checkpoint-8", "checkpoint-6"]
    assert "no alignkit_checkpoint.json and no trainer_state.json" in skipped[0][1]
    assert "model.safetensors has 60 bytes, the manifest says" in skipped[1][1]
    assert "skipped checkpoint-6: model.safetensors has 60 bytes" in caplog.text
    # without a manifest, each file's own structure still tells a truncated file
    with open(legacy / "optimizer.pt", "r+b") as f:
        f.truncate(f.seek(0, 2) - 10)
    assert "optimizer.pt: truncated or corrupt" in checkpoint_problems(legacy)[0]
    with open(legacy / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    assert any("model.safetensors: " in p and "its header describes" in p for p in checkpoint_problems(legacy))


def test_resume_values(tmp_path):
    good = _fake_checkpoint(tmp_path, 2)
    assert resolve_resume_checkpoint("auto", tmp_path) == str(good)
    assert resolve_resume_checkpoint(True, tmp_path) == str(good)
    assert resolve_resume_checkpoint("false", tmp_path) is None and resolve_resume_checkpoint(None, tmp_path) is None
    assert resolve_resume_checkpoint("auto", tmp_path / "missing") is None  # a fresh output_dir starts fresh
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        resolve_resume_checkpoint(True, tmp_path / "missing", require=True)
    (good / "trainer_state.json").write_text('{"global_step": ')
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-2: not a complete checkpoint "
                                              r"\(trainer_state.json has \d+ bytes, the manifest says"):
        resolve_resume_checkpoint(str(good), tmp_path)


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / ".tmp-checkpoint-4" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / ".trash-checkpoint-2-1-2").mkdir()
    keep = _fake_checkpoint(tmp_path, 2)
    assert sorted(remove_leftovers(tmp_path)) == [".tmp-checkpoint-4", ".trash-checkpoint-2-1-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep.name]


def test_checkpoint_size_estimate_covers_the_real_checkpoint(baseline, model_dir):
    """Parameters × dtype size for the weights plus two fp32 Adam tensors per trainable parameter (plus
    the tokenizer and 1 MB): at least the real checkpoint, and not more than 1.5 MB above it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = baseline
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    size = checkpoint_size(model, optim="adamw_torch", tokenizer=AutoTokenizer.from_pretrained(model_dir))
    n = sum(p.numel() for p in model.parameters())
    assert size.weights == n * 4 and size.optimizer == n * 8
    real = sum(p.stat().st_size for p in (out / f"checkpoint-{MAX_STEPS}").iterdir())
    assert real <= size.total <= real + 1.5 * 2**20, (real, size)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    adapter = checkpoint_size(lora, optim="adamw_torch")
    assert adapter.weights == trainable * 4 and adapter.optimizer == trainable * 8
    assert checkpoint_size(model, optim="sgd", save_only_model=True).optimizer == 0


def test_preflight_names_the_shortfall(tmp_path):
    from alignkit.output_dir import CheckpointSize

    check_writable(tmp_path)
    huge = CheckpointSize(weights=2**60, optimizer=0, tokenizer=0)
    with pytest.raises(OutputDirUnusable, match=r"has [\d.]+ MB free, but one checkpoint needs about"):
        preflight_output_dir(tmp_path, huge)
    preflight_output_dir(tmp_path, CheckpointSize(weights=1, optimizer=1, tokenizer=1))
    assert list(tmp_path.iterdir()) == []  # the write probe is gone
