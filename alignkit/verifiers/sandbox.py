"""Run an untrusted Python program: :func:`run_sandboxed` -> :class:`SandboxResult`.

**Isolation levels** (``isolation=``), never silent:

- ``"strict"``: the program runs inside the kernel boundary of
  :mod:`alignkit.verifiers.sandbox_boundary` (bubblewrap: a throwaway uid with no capabilities, a
  read-only minimal mount view, private ``/tmp`` and ``/dev/shm``, no network, no host sockets, new
  PID/IPC/UTS namespaces, a new session that dies with the verifier, a per-run cgroup for tasks and
  memory where the machine allows it, seccomp where libseccomp is installed). Without it,
  :class:`SandboxUnavailableError` is raised: nothing runs. **This is the level for RL rollouts.**
- ``"auto"``: the boundary when it works here; otherwise the program runs at ``"none"`` and the
  fallback is logged (once per reason) and recorded in :attr:`SandboxResult.fallback`, so every
  verdict made that way says so.
- ``"none"``: no kernel boundary, for trusted code only (a program that sets out to can escape).

Inside, at every level, the child program :mod:`alignkit.verifiers.sandbox_child` sets resource
limits (``RLIMIT_CPU`` soft = ``cpu_seconds``, hard one second later; ``RLIMIT_AS`` = ``memory_mb``;
``RLIMIT_FSIZE``; ``RLIMIT_NOFILE``; ``RLIMIT_NPROC``, exact per run under the boundary; no core
files) and installs an audit hook that refuses and reports network use, process creation, signals,
writes outside the sandbox's directories and a few forms of introspection. The hook names what a
program tried (``limit: network``...); the boundary is what holds when a program gets past it. The
parent enforces the wall-clock limit and the output cap, kills what is left, and removes what was
made (at ``"none"`` a temporary directory; under the boundary everything lives in tmpfs that
disappears with the namespace).

``steps`` (used by the code verifier): after the program, the child evaluates each ``Step`` in the
program's namespace and returns plain data (:class:`StepResult`) on a private descriptor: the
value of an ``eval`` step, the truth of a ``truth`` step, or whether an ``exec`` step raised. The
caller judges those values itself, so a wrong program cannot write a pass (see
:mod:`alignkit.verifiers.code_judge`); ``exec`` results are the program's own word.

What :attr:`SandboxResult.limit_hit` means: ``"cpu_time"``, ``"wall_time"``, ``"memory"``
(``MemoryError``, or the cgroup's OOM killer), ``"file_size"`` (``SIGXFSZ``/``EFBIG``), ``"output"``
(more than ``max_output_bytes`` on stdout or stderr, or an oversized report), ``"network"``,
``"processes"`` (process creation refused, or the task limit reached), ``"filesystem"``,
``"signal"`` (the program tried to signal another process, or died of a signal no limit explains,
e.g. ``SIGSEGV``), ``"forbidden"`` (``ctypes``, sub-interpreters, interpreter introspection, raising
a limit, a malformed report) or ``None``.
"""

from __future__ import annotations

import functools
import logging
import marshal
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.verifiers import sandbox_child
from alignkit.verifiers.sandbox_boundary import SANDBOX_ROOT, Boundary, data_fd, get_boundary
from alignkit.verifiers.sandbox_child import TAG, MalformedResult, decode_values

__all__ = [
    "ISOLATION_LEVELS",
    "LIMIT_KINDS",
    "SandboxResult",
    "SandboxUnavailableError",
    "Step",
    "StepResult",
    "TAG",
    "resolve_isolation",
    "run_sandboxed",
]

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("strict", "auto", "none")

LIMIT_KINDS = (
    "cpu_time",
    "wall_time",
    "memory",
    "file_size",
    "processes",
    "output",
    "network",
    "filesystem",
    "signal",
    "forbidden",
)

_REPORT_CAP = 16 << 20  # bytes the parent accepts on the report pipe
_SANDBOX_PREFIX = "alignkit-sandbox-"


class SandboxUnavailableError(RuntimeError):
    """``isolation="strict"`` on a machine where the kernel boundary does not work."""


@dataclass(frozen=True)
class Step:
    """One thing the child does after the program: ``kind`` is ``"eval"`` (return the value of the
    expression ``source``), ``"truth"`` (return its truth) or ``"exec"`` (run the statements)."""

    kind: str
    source: str

    def __post_init__(self):
        if self.kind not in ("eval", "truth", "exec"):
            raise ValueError(f"a step's kind is 'eval', 'truth' or 'exec', got {self.kind!r}")


@dataclass(frozen=True)
class StepResult:
    """What a step gave: ``ok`` (the expression evaluated, or the statements did not raise), its
    ``value`` (plain data, for ``eval``/``truth``), or the exception's type and message."""

    ok: bool
    value: Any = None
    error_type: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    limit_hit: str | None
    duration_s: float
    cpu_s: float = 0.0
    #: ``"<kind>: <operation>"`` for every operation the audit hook refused, in order
    blocked: tuple[str, ...] = ()
    #: one result per step when ``steps`` were given and a well-formed report came back; else ``None``
    steps: tuple[StepResult, ...] | None = None
    #: ``"strict"`` (inside the kernel boundary) or ``"none"``
    isolation: str = "none"
    #: what held around the program (``"bubblewrap 0.8.0, throwaway uid, cgroup v1 (pids, memory), ..."``)
    boundary: str = ""
    #: at ``isolation="auto"``: why the boundary was not used (``None`` when it was, or not asked for)
    fallback: str | None = None
    #: why the report was rejected (two reports, a malformed one), if it was
    report_problem: str | None = None

    @property
    def ok(self) -> bool:
        """Exit status 0 and no limit hit."""
        return self.returncode == 0 and self.limit_hit is None


# ------------------------------------------------------------------------------------ isolation

_warned: set[str] = set()
_warn_lock = threading.Lock()


def resolve_isolation(isolation: str, python: str = sys.executable) -> tuple[Boundary | None, str | None]:
    """``(boundary or None, fallback reason or None)`` for an isolation level.

    ``"strict"`` raises :class:`SandboxUnavailableError` where the boundary does not work; ``"auto"``
    falls back with a warning (logged once per reason); ``"none"`` gives ``(None, None)``.
    """
    if isolation not in ISOLATION_LEVELS:
        raise ValueError(f"isolation is one of {ISOLATION_LEVELS}, got {isolation!r}")
    if isolation == "none":
        return None, None
    boundary = get_boundary(python)
    if boundary.available:
        return boundary, None
    if isolation == "strict":
        raise SandboxUnavailableError(
            f"isolation='strict' refuses to run: the kernel boundary is unavailable: {boundary.reason}. "
            "Install it (as root: apt-get install -y bubblewrap), or use isolation='auto'/'none' for trusted code."
        )
    with _warn_lock:
        if boundary.reason not in _warned:
            _warned.add(boundary.reason)
            logger.warning(
                "code sandbox: the kernel boundary is unavailable (%s); isolation='auto' runs programs WITHOUT it "
                "(level 'none', not safe for untrusted code) and records this in every result",
                boundary.reason,
            )
    return None, boundary.reason


# ------------------------------------------------------------------------------------ the child program

# The bootstrap (``python -c``) reads the job from a private descriptor, runs the child module and
# calls its ``main``.
BOOT = (
    "import sys,marshal,posix\n"
    "_f=int(sys.argv[1]);_c=[]\n"
    "while True:\n"
    "    _b=posix.read(_f,1<<20)\n"
    "    if not _b:break\n"
    "    _c.append(_b)\n"
    "posix.close(_f);_j=marshal.loads(b''.join(_c));del _f,_c,_b\n"
    "_g={'__name__':'__alignkit_sandbox_child__','__builtins__':__builtins__}\n"
    "_h=_j.pop('harness')\n"
    "exec(compile(_h,'<alignkit-sandbox-child>','exec') if type(_h) is str else _h,_g);del _h\n"
    "_g['main'](_j)\n"
)

_harness_lock = threading.Lock()
_harness_cache: dict[str, object] = {}


def _harness(python: str):
    """The child module for ``python``: a code object for this interpreter, its source for another."""
    same = os.path.realpath(python) == os.path.realpath(sys.executable)
    key = "code" if same else "source"
    with _harness_lock:
        if key not in _harness_cache:
            with open(sandbox_child.__file__, encoding="utf-8") as f:
                source = f.read()
            _harness_cache["source"] = source
            _harness_cache["code"] = compile(source, "<alignkit-sandbox-child>", "exec", dont_inherit=True)
        return _harness_cache[key]


_site_cache: dict[str, tuple[str, ...]] = {}


def _site_dirs(python: str) -> tuple[str, ...]:
    if python in _site_cache:
        return _site_cache[python]
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # not realpath: venvs share the binary
        import site

        dirs = tuple(site.getsitepackages())
    else:
        try:
            out = subprocess.run(
                [python, "-I", "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
                capture_output=True, timeout=30, text=True, check=False,
            )
            dirs = tuple(line for line in out.stdout.splitlines() if line)
        except (OSError, subprocess.SubprocessError):
            dirs = ()
    _site_cache[python] = dirs
    return dirs


_task_count_cache = [0.0, 0]


def _user_task_count() -> int:
    """Tasks (threads included) owned by this real uid, as RLIMIT_NPROC counts them; cached for 1 s."""
    now = time.monotonic()
    if now - _task_count_cache[0] < 1.0:
        return _task_count_cache[1]
    uid = os.getuid()
    count = 0
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                count += int(fields[17])  # num_threads
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        count = 0
    _task_count_cache[0], _task_count_cache[1] = now, count
    return count


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # .../alignkit


@functools.lru_cache(maxsize=None)
def _deny_read_paths() -> tuple[str, ...]:
    """The parent's home directory (readable where the interpreter itself lives there)."""
    home = os.path.expanduser("~")
    if home and home != "/" and os.path.isdir(home):
        return (os.path.realpath(home),)
    return ()


@functools.lru_cache(maxsize=None)
def _allow_read_paths(python: str) -> tuple[str, ...]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    return tuple(sorted(os.path.realpath(p) for p in paths if p))


def _rmtree(path: str) -> None:
    """Remove ``path`` even where the program made directories unreadable or unwritable."""

    def on_error(func, p, exc_info):
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=on_error)
    if os.path.lexists(path):  # second pass after the permission fixes
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        logger.warning("sandbox directory %s could not be removed (immutable files?)", path)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------ running


def run_sandboxed(
    source: str,
    *,
    stdin: str = "",
    cpu_seconds: float = 5,
    wall_seconds: float = 10,
    memory_mb: int = 512,
    file_size_mb: int = 16,
    max_processes: int = 16,
    max_output_bytes: int = 64_000,
    python: str = sys.executable,
    steps: Sequence[Step] | None = None,
    main_name: str = "__main__",
    isolation: str = "auto",
    max_open_files: int = 256,
) -> SandboxResult:
    """Run ``source`` as a Python program at the given isolation level and report what happened.

    ``stdin`` is the program's standard input. ``steps``: evaluated after the program in its
    namespace, one :class:`StepResult` each in :attr:`SandboxResult.steps`. ``main_name`` is the
    program's ``__name__`` (the steps always see ``"__main__"``). ``max_processes`` is how many tasks
    (processes and threads, the main thread included) the program may have at once; it is exact
    under the boundary, and not enforced at ``"none"`` when the verifier runs as root.
    """
    boundary, fallback = resolve_isolation(isolation, python)
    cpu = max(1, int(-(-cpu_seconds // 1)))
    max_tasks = max(1, int(max_processes))
    uid = boundary.new_uid() if boundary is not None else None
    if uid is not None:
        nproc: int | None = max_tasks  # the run's own uid: the count is the program's alone
    elif os.geteuid() != 0:
        nproc = _user_task_count() + max_tasks
    else:
        nproc = None  # the kernel does not apply RLIMIT_NPROC to root
    job_steps = [(s.kind, s.source) for s in steps] if steps is not None else None

    host_root = None
    pipes: list[int] = []
    cgroup = None
    proc = None
    start = time.monotonic()
    try:
        if boundary is not None:
            root = SANDBOX_ROOT
            make_dirs = [root + "/work", root + "/home", root + "/tmp"]
            write_roots = ["/tmp", "/dev/shm"]
            deny_read = []
        else:
            host_root = os.path.realpath(tempfile.mkdtemp(prefix=_SANDBOX_PREFIX))
            root = host_root
            for d in ("work", "home", "tmp"):
                os.mkdir(os.path.join(root, d), 0o700)
            make_dirs, write_roots, deny_read = [], [], list(_deny_read_paths())
        cwd, home, tmp = root + "/work", root + "/home", root + "/tmp"

        report_r, report_w = os.pipe()
        pipes += [report_r, report_w]
        job = {
            "harness": _harness(python),
            "program": source,
            "steps": job_steps,
            "report_fd": report_w,
            "root": root,
            "cwd": cwd,
            "make_dirs": make_dirs,
            "write_roots": write_roots,
            "main_name": main_name,
            "site": list(_site_dirs(python)),
            "deny_read": deny_read,
            "deny_read_strict": [_PACKAGE_DIR],
            "allow_read": list(_allow_read_paths(python)),
            "limits": {
                "cpu": cpu,
                "as": int(memory_mb) * 1024 * 1024,
                "fsize": int(file_size_mb) * 1024 * 1024,
                "nofile": int(max_open_files),
                "nproc": nproc,
            },
        }
        job_fd = data_fd(marshal.dumps(job))
        pipes.append(job_fd)
        stdin_fd = data_fd(stdin.encode("utf-8", "surrogateescape"))
        pipes.append(stdin_fd)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": tmp,
            "TMP": tmp,
            "TEMP": tmp,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "NUMEXPR_NUM_THREADS": "1",
        }
        argv = [python, "-I", "-S", "-B", "-c", BOOT, str(job_fd)]
        pass_fds = [job_fd, report_w]
        if boundary is not None:
            seccomp_fd = None
            if boundary.seccomp is not None:
                seccomp_fd = data_fd(boundary.seccomp)
                pipes.append(seccomp_fd)
                pass_fds.append(seccomp_fd)
            cgroup = boundary.cgroup(max_tasks, memory_mb)
            cmd = boundary.command(argv, uid=uid, seccomp_fd=seccomp_fd, cgroup=cgroup,
                                   tmpfs_mb=max(int(file_size_mb), 8))
            popen_cwd = "/"
        else:
            cmd, popen_cwd = argv, cwd
        proc = subprocess.Popen(
            cmd,
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=popen_cwd,
            env=env,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            close_fds=True,
        )
        for fd in list(pipes):
            if fd != report_r:
                os.close(fd)
                pipes.remove(fd)

        stop = None
        if boundary is not None:
            def stop(proc=proc, cgroup=cgroup):
                _stop_inside(proc, cgroup)
        out, err, rep, killed_for, status, rusage = _supervise(
            proc, report_r, start + float(wall_seconds), int(max_output_bytes), stop
        )
        duration = time.monotonic() - start
        oom = pids_hit = False
        cgroup_cpu = None
        if cgroup is not None:
            cgroup.kill_all()
            oom, pids_hit = cgroup.limits_hit()
            cgroup_cpu = cgroup.cpu_seconds()
    finally:
        if proc is not None and proc.returncode is None:
            if boundary is not None:
                _stop_inside(proc, cgroup)
            _kill_group(proc.pid)
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:
                pass
            proc.returncode = -9
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for fd in pipes:
            try:
                os.close(fd)
            except OSError:
                pass
        if cgroup is not None:
            cgroup.close()
        if host_root is not None:
            _rmtree(host_root)

    report = _parse_report(rep, len(job_steps) if job_steps is not None else None)
    if not report.started and boundary is not None and not killed_for:
        # the program never started: the boundary itself failed (bwrap's message is on stderr)
        raise SandboxUnavailableError(
            f"the sandbox did not start (exit status {os.waitstatus_to_exitcode(status)}): "
            f"{' '.join(err.decode('utf-8', 'replace').split())[-500:]}"
        )
    returncode = os.waitstatus_to_exitcode(status)
    if boundary is not None and returncode > 128 and report.exit_status != returncode:
        returncode = -(returncode - 128)  # bwrap reports a child killed by signal N as 128 + N
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    cpu_used = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
    if cgroup_cpu is not None:
        cpu_used = max(cpu_used, cgroup_cpu)
    elif boundary is not None and returncode == -signal.SIGKILL and killed_for is None and duration >= cpu:
        # bwrap does not pass its children's CPU time on; a SIGKILL nobody here sent, after at least
        # the CPU limit in wall time, is the hard RLIMIT_CPU
        cpu_used = max(cpu_used, float(cpu))

    blocked_kinds = [b.partition(": ")[0] for b in report.blocked]
    blocked = list(report.blocked)
    if report.problem:
        blocked_kinds.append("forbidden")
        blocked.append(f"forbidden: {report.problem}")
    if report.oversized and killed_for is None:
        killed_for = "output"
    limit = _classify(
        killed_for, blocked_kinds, report.cpu_flag, returncode, cpu_used, cpu, stderr, report.steps,
        rusage, memory_mb, oom, pids_hit,
    )
    return SandboxResult(
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=killed_for == "wall_time",
        limit_hit=limit,
        duration_s=duration,
        cpu_s=cpu_used,
        blocked=tuple(blocked),
        steps=report.steps,
        isolation="strict" if boundary is not None else "none",
        boundary=boundary.describe() if boundary is not None else "",
        fallback=fallback,
        report_problem=report.problem,
    )


@dataclass
class _Report:
    started: bool = False
    blocked: tuple[str, ...] = ()
    cpu_flag: bool = False
    exit_status: int | None = None
    steps: tuple[StepResult, ...] | None = None
    problem: str | None = None
    oversized: bool = False


def _parse_report(raw: bytes, n_steps: int | None) -> _Report:
    """The report lines (see :mod:`alignkit.verifiers.sandbox_child`). Anything out of shape makes
    ``problem`` say so; it never makes a step pass."""
    report = _Report(oversized=len(raw) >= _REPORT_CAP)
    blocked: list[str] = []
    results: list[tuple[StepResult, ...] | None] = []
    for line in raw.decode("ascii", "replace").split("\n"):
        if not line:
            continue
        parts = line.split(" ")
        head = parts[0]
        if head == "H" and len(parts) == 1:
            report.started = True
        elif head == "B" and len(parts) == 3:
            try:
                what = bytes.fromhex(parts[2]).decode("utf-8", "replace")
            except ValueError:
                what = "?"
            blocked.append(f"{parts[1]}: {what}")
        elif head == "L" and parts[1:] == ["cpu_time"]:
            report.cpu_flag = True
        elif head == "X" and len(parts) == 2 and parts[1].isdigit():
            report.exit_status = int(parts[1])
        elif head == "R":
            results.append(_parse_steps(parts, n_steps) if n_steps is not None else None)
        elif not report.oversized:
            report.problem = "a malformed report line"
    report.blocked = tuple(blocked)
    if n_steps is not None:
        if len(results) > 1:
            report.problem = "more than one test report"
        elif len(results) == 1:
            if results[0] is None:
                report.problem = "a malformed test report"
            else:
                report.steps = results[0]
    elif results:
        report.problem = "a test report where none was asked for"
    return report


def _parse_steps(tokens: list[str], n_steps: int) -> tuple[StepResult, ...] | None:
    out: list[StepResult] = []
    i = 1
    try:
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if token == "V":
                value, i = decode_values(tokens, i)
                out.append(StepResult(True, value))
            elif token == "P":
                out.append(StepResult(True))
            elif token[:1] in ("E", "F") and "." in token:
                tname, _, msg = token[1:].partition(".")
                out.append(StepResult(False, None, bytes.fromhex(tname).decode("utf-8", "replace") or "Exception",
                                      bytes.fromhex(msg).decode("utf-8", "replace")))
            else:
                return None
    except (MalformedResult, ValueError, RecursionError, MemoryError):
        return None
    return tuple(out) if len(out) == n_steps else None


_BLOCKED_RE = re.compile(TAG + r": blocked (\w+)")


def _classify(killed_for, blocked_kinds, cpu_flag, returncode, cpu_used, cpu_limit, stderr,
              steps, rusage, memory_mb, oom, pids_hit) -> str | None:
    if blocked_kinds:
        return blocked_kinds[0]
    if killed_for is not None:
        return killed_for
    if cpu_flag:
        return "cpu_time"
    if oom:
        return "memory"
    tail = stderr[-4000:]
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "cpu_time"
        if sig == signal.SIGXFSZ:
            return "file_size"
        if sig == signal.SIGKILL:
            if cpu_used >= cpu_limit - 0.05:
                return "cpu_time"
            if rusage is not None and rusage.ru_maxrss * 1024 >= 0.9 * memory_mb * 1024 * 1024:
                return "memory"
        return "signal"
    m = _BLOCKED_RE.search(tail)
    if m and m.group(1) in LIMIT_KINDS:
        return m.group(1)
    if re.search(r"^[\w.]*MemoryError\b", tail, re.M):  # numpy's _ArrayMemoryError too
        return "memory"
    if "[Errno 27] File too large" in tail:
        return "file_size"
    if steps is not None and any((s.error_type or "").endswith("MemoryError") for s in steps):
        return "memory"
    if pids_hit or "can't start new thread" in tail:
        return "processes"
    return None


def _descendant_pids(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        out += frontier
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stop_inside(proc: subprocess.Popen, cgroup) -> None:
    """Kill a boundary run from the inside out: the program's processes first, so that bwrap's
    init and monitor exit and are reaped in order. (Killing bwrap first would orphan its init, whose
    zombie then waits for whoever inherits it, keeping the run's cgroup busy.)"""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:
            return
        pids = cgroup.pids() if cgroup is not None else _descendant_pids(proc.pid)
        for pid in pids:
            if pid != proc.pid and _comm(pid) != "bwrap":
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.005)


def _supervise(proc: subprocess.Popen, report_r: int, deadline: float, cap: int, stop=None):
    """Collect stdout/stderr/report until the process ends or a limit is hit; reap it.

    ``stop()`` ends a run that hit a limit before its process group is killed. Returns
    ``(stdout, stderr, report, killed_for, wait_status, rusage)``.
    """
    bufs = {"out": bytearray(), "err": bytearray(), "rep": bytearray()}
    caps = {"out": cap, "err": cap, "rep": _REPORT_CAP}
    fds = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err", report_r: "rep"}
    sel = selectors.DefaultSelector()
    for fd, name in fds.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    pidfd = None
    try:
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ, "pid")
    except (AttributeError, OSError):
        pidfd = None
    killed_for = None
    exited = False
    open_streams = len(fds)
    drain_until = None
    try:
        while True:
            now = time.monotonic()
            if not exited and now >= deadline:
                killed_for = "wall_time"
                break
            if exited and (open_streams == 0 or now >= drain_until):
                break
            timeout = (deadline if not exited else drain_until) - now
            if pidfd is None and not exited:
                timeout = min(timeout, 0.005)
            events = sel.select(timeout=max(0.0, timeout))
            for key, _ in events:
                name = key.data
                if name == "pid":
                    sel.unregister(key.fd)
                    exited = True
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    open_streams -= 1
                    continue
                buf = bufs[name]
                room = caps[name] - len(buf)
                buf += chunk[: max(0, room)]
                if len(chunk) > room and killed_for is None:
                    killed_for = "output"
            if killed_for is not None:
                break
            if pidfd is None and not exited:
                try:
                    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    info = None
                exited = info is not None
            if exited and drain_until is None:
                # the program is gone; anything still holding the pipes is a leftover: kill it
                _kill_group(proc.pid)
                drain_until = time.monotonic() + 0.5
    finally:
        if stop is not None and not exited:
            stop()
        _kill_group(proc.pid)  # the leader is at worst a zombie here, so its pgid cannot be reused
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # whatever is still buffered in the pipes (the writers are dead now)
    for fd, name in fds.items():
        try:
            while len(bufs[name]) < caps[name]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                bufs[name] += chunk[: caps[name] - len(bufs[name])]
        except (BlockingIOError, OSError):
            pass
    return bytes(bufs["out"]), bytes(bufs["err"]), bytes(bufs["rep"]), killed_for, status, rusage
