"""The sandboxed code verifier at every isolation level: correct programs pass, hostile ones are
contained and named, the isolation ladder is never silent, and the kernel boundary holds.

Every test leaves nothing behind: the autouse fixture points ``tempfile`` at a private directory and
checks that it is empty, that this process has no child processes left and that no per-run cgroup
of this process remains. Limits are small (1 s of CPU, 5 s of wall time). The full hostile corpus,
at every level, is ``tests/test_hostile_corpus.py`` (slow).
"""

from __future__ import annotations

import dis
import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from alignkit.verifiers import get_verifier
from alignkit.verifiers.base import Verdict
from alignkit.verifiers.code import CodeVerifier, extract_program
from alignkit.verifiers.sandbox import (
    SandboxResult,
    SandboxUnavailableError,
    Step,
    resolve_isolation,
    run_sandboxed,
)
from alignkit.verifiers import sandbox_child
from alignkit.verifiers.sandbox_boundary import UID_BASE, UID_RANGE, get_boundary

FAST = {"cpu_seconds": 1, "wall_seconds": 5, "memory_mb": 256}  # wall: slack for a loaded machine
PACKAGE_DIR = os.path.dirname(os.path.abspath(sandbox_child.__file__))  # project files: never visible inside
BOUNDARY = get_boundary()
NEEDS_BOUNDARY = pytest.mark.skipif(
    not BOUNDARY.available, reason=f"the kernel boundary is unavailable on this machine: {BOUNDARY.reason}"
)
LEVELS = [pytest.param("strict", marks=NEEDS_BOUNDARY), "auto", "none"]
#: the level of the tests that do not name one: the boundary where this machine has it
DEFAULT_LEVEL = "strict" if BOUNDARY.available else "none"


def note(isolation: str) -> str:
    """What ``auto`` adds to every verdict where it runs without the boundary."""
    if isolation == "auto" and not BOUNDARY.available:
        return f" [isolation: none, the kernel boundary is unavailable: {BOUNDARY.reason}]"
    return ""

# an unstubbed fork_exec, reached the way a hostile program would (see tests/hostile_corpus.py)
FORK_EXEC = r'''
import sys, os, glob, importlib.machinery
def _fresh(name):
    for d in sys.path:
        for p in glob.glob(d + "/" + name + ".*.so"):
            spec = importlib.machinery.ModuleSpec("x." + name, importlib.machinery.ExtensionFileLoader("x." + name, p), origin=p)
            return sys.modules["_imp"].create_dynamic(spec)
_ps = _fresh("_posixsubprocess")
def spawn(args, setsid=False):
    r, w = os.pipe()
    pid = _ps.fork_exec([a.encode() for a in args], [args[0].encode()], True, (), None, None,
                        -1, -1, -1, -1, -1, -1, r, w, True, setsid, -1, None, None, None, -1, None, False)
    os.close(w)
    return pid
'''


def _children() -> list[int]:
    """PIDs of this process's live (non-zombie) descendants."""
    me, parents = os.getpid(), {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = (int(fields[1]), fields[0])
            except OSError:
                pass
    out, frontier = [], {me}
    while frontier:
        kids = {pid for pid, (ppid, state) in parents.items() if ppid in frontier and state != "Z"}
        out += kids
        frontier = kids
    return out


def _my_cgroups() -> list[str]:
    if BOUNDARY.cgroups is None:
        return []
    return [p for _, parent in BOUNDARY.cgroups.parents for p in glob.glob(f"{parent}/alignkit-sandbox-{os.getpid()}-*")]


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path, monkeypatch):
    """Sandboxes go to a private temp dir, which must be empty afterwards; no child, no cgroup may survive."""
    sandboxes = tmp_path / "sandboxes"
    sandboxes.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandboxes))
    before = set(_children())
    yield sandboxes
    leftover = [p for p in _children() if p not in before]
    for _ in range(40):  # a killed process may take a moment to be gone from /proc
        if not leftover:
            break
        time.sleep(0.05)
        leftover = [p for p in _children() if p not in before]
    assert leftover == [], f"processes left behind: {leftover}"
    assert list(sandboxes.iterdir()) == [], "sandbox temp dirs left behind"
    assert _my_cgroups() == [], "sandbox cgroups left behind"


def verdict(program: str, tests=None, **kwargs) -> Verdict:
    problem = {"prompt": "p"}
    if tests is not None:
        problem["tests"] = tests
    problem.update(kwargs.pop("problem", {}))
    options = {**FAST, "isolation": DEFAULT_LEVEL, **kwargs}
    return CodeVerifier(**options).verify(problem, f"Here you go:\n```python\n{program}\n```\n")


def assert_limit(v: Verdict, kind: str):
    assert not v.correct and v.score == 0.0, v
    assert v.reason.startswith(f"limit: {kind}"), v


# ------------------------------------------------------------------------------ correct programs


ADD = "def add(a, b):\n    return a + b"


@pytest.mark.parametrize("isolation", LEVELS)
def test_correct_programs_pass_at_every_level(isolation):
    assert verdict(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], isolation=isolation) == Verdict(
        True, 1.0, "ok: 2/2 tests passed" + note(isolation))
    unittest_program = ("import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
                        "        self.assertEqual(add(2, 3), 5)\n        self.assertTrue(add(0, 0) == 0)\n"
                        "if __name__ == '__main__':\n    unittest.main()\n")
    ok = Verdict(True, 1.0, "ok: the test program passed" + note(isolation))
    assert verdict(ADD, unittest_program, isolation=isolation) == ok
    exit_program = "import sys\nassert add(2, 2) == 4\nsys.exit(0)\n"
    assert verdict(ADD, exit_program, isolation=isolation) == ok
    # the same, when the test program must run inside the program (a loop): still correct, and flagged
    loop_program = "import sys\nfor i in range(3):\n    assert add(i, i) == 2 * i\nsys.exit(0)\n"
    v = verdict(ADD, loop_program, isolation=isolation)
    assert v == Verdict(True, 1.0, "ok: the test program passed (judged inside the program, which could forge it)"
                           + note(isolation))
    loud = ADD + "\nimport sys, logging\nprint('noise', file=sys.stderr)\nlogging.warning('careful')\nsys.exit(0)"
    assert verdict(loud, ["assert add(1, 1) == 2"], isolation=isolation).correct
    v = verdict("import sys\nprint(sum(map(int, sys.stdin.read().split())))\nprint('dbg', file=sys.stderr)",
                problem={"stdin": "4 5 6\n", "answer": 15}, isolation=isolation)
    assert v == Verdict(True, 1.0, "ok: output matches the answer" + note(isolation))


def test_partial_score_two_of_three():
    v = verdict("def sq(x):\n    return x * x if x < 10 else 0", ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(10) == 100"])
    assert not v.correct
    assert v.score == pytest.approx(2 / 3)
    assert v.reason == "test 3 of 3 failed (assert sq(10) == 100): AssertionError: got sq(10) = 0"


def test_text_test_program_and_stdin():
    program = "import sys\ndef total(xs):\n    return sum(xs)\nif __name__ == '__main__':\n    print(total(map(int, sys.stdin.read().split())))"
    test_program = "def check(f):\n    assert f([1, 2]) == 3\n    assert f([]) == 0\nif __name__ == '__main__':\n    check(total)\n"
    assert verdict(program, test_program) == Verdict(True, 1.0, "ok: the test program passed")
    v = verdict(program, problem={"stdin": "4 5\n", "answer": 15})
    assert not v.correct and v.reason == "wrong output: expected '15', got '9'"
    r = run_sandboxed("print(input()[::-1])", stdin="abc\n", **FAST)
    assert r.ok and r.stdout == "cba\n"


def test_syntax_error_and_exception_are_incorrect():
    v = verdict("def f(:\n    pass", ["assert f() is None"])
    assert not v.correct and v.score == 0.0 and "SyntaxError" in v.reason
    v = verdict("def f():\n    return 1 / 0\nf()", ["assert True"])
    assert not v.correct and "ZeroDivisionError" in v.reason
    v = verdict("def f():\n    return 1 / 0", ["assert f() == 1", "assert 1 == 1"])
    assert not v.correct and v.score == 0.5 and "ZeroDivisionError: division by zero" in v.reason
    v = verdict("import sys\nsys.exit(3)", ["assert True"])
    assert v == Verdict(False, 0.0, "error: exit status 3")


@pytest.mark.parametrize("isolation", [pytest.param("strict", marks=NEEDS_BOUNDARY), "none"])
def test_common_libraries_are_not_flagged(isolation):
    program = (
        "import collections, heapq, itertools, functools, typing, dataclasses, fractions, decimal, json\n"
        "import math, random, re, bisect, io, tempfile, logging, threading, pathlib, asyncio, pickle\n"
        "logging.getLogger('x').warning('fine')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('ok')\n"
        "with open('local.txt', 'w') as g:\n    g.write('ok')\n"
        "print(open('local.txt').read(), open('/dev/null', 'w') is not None)\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "@dataclasses.dataclass\nclass P:\n    x: int\n"
        "Point = collections.namedtuple('Point', 'x y')\n"
        "print(pickle.loads(pickle.dumps(P(1))), Point(1, 2))\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "print(pathlib.Path('local.txt').read_text())\n"
        "try:\n    import numpy as np\n    print(int(np.arange(4).sum()))\nexcept ImportError:\n    print(6)\n"
    )
    r = run_sandboxed(program, cpu_seconds=5, wall_seconds=10, isolation=isolation)
    assert r.ok, (r.limit_hit, r.blocked, r.stderr)
    assert r.stdout.splitlines()[-1] == "6"


def test_results_are_plain_data_judged_here():
    """A result whose ``__eq__`` always agrees is not plain data: the test fails, naming why."""
    program = "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()"
    v = verdict(program, ["assert add(1, 2) == 3"])
    assert not v.correct and "UnsupportedResult" in v.reason and "only plain data" in v.reason
    r = run_sandboxed(ADD, steps=[Step("eval", "add(2, 3)"), Step("eval", "[add(1, 1), {1: (2.5, None)}, {3}]"),
                                  Step("truth", "add(0, 0)"), Step("exec", "assert add(1, 1) == 3"),
                                  Step("eval", "1 / 0")], **FAST)
    values = [(s.ok, s.value, s.error_type) for s in r.steps]
    assert values == [(True, 5, None), (True, [2, {1: (2.5, None)}, {3}], None), (True, False, None),
                      (False, None, "AssertionError"), (False, None, "ZeroDivisionError")]


# ------------------------------------------------------------------------------ hostile programs


@pytest.mark.parametrize("isolation", LEVELS)
def test_fork_bomb_and_process_creation(isolation):
    assert_limit(verdict("import os\nwhile True:\n    os.fork()", ["assert True"], isolation=isolation), "processes")
    v = verdict("import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()", isolation=isolation)
    assert_limit(v, "processes")
    assert_limit(verdict("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])", isolation=isolation),
                 "processes")
    assert_limit(verdict("import os\nos.system('sleep 100 &')", isolation=isolation), "processes")
    r = run_sandboxed("import _posixsubprocess\n_posixsubprocess.fork_exec()", isolation=isolation, **FAST)
    assert r.limit_hit == "processes"


def test_infinite_loop_hits_cpu_limit():
    start = time.monotonic()
    v = verdict("while True:\n    pass", ["assert True"], wall_seconds=10)  # CPU, not wall, must stop it
    assert_limit(v, "cpu_time")
    assert time.monotonic() - start < 8  # 1 s of CPU; slack for a loaded machine
    # ignoring SIGXCPU only buys the second before the hard limit's SIGKILL
    v = verdict("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass", wall_seconds=10)
    assert_limit(v, "cpu_time")


def test_sleep_hits_wall_limit():
    start = time.monotonic()
    r = run_sandboxed("import time\ntime.sleep(1000)", **{**FAST, "wall_seconds": 2})
    assert r.timed_out and r.limit_hit == "wall_time"
    assert 1.9 < r.duration_s < 4.5 and time.monotonic() - start < 6


def test_memory_bombs():
    assert_limit(verdict("x = bytearray(10**10)"), "memory")
    assert_limit(verdict("x = []\nwhile True:\n    x.append(bytearray(10**6))", wall_seconds=10), "memory")


def test_file_size_limit():
    r = run_sandboxed("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)", file_size_mb=4, **FAST)
    assert r.limit_hit == "file_size"


@pytest.mark.parametrize("isolation", LEVELS)
def test_write_outside_the_sandbox_is_blocked(tmp_path, isolation):
    target_dir = tmp_path / "open"
    target_dir.mkdir()
    target_dir.chmod(0o777)
    target = target_dir / "pwned.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import os\nos.chdir({str(target_dir)!r})\nopen('pwned.txt', 'a').write('x')",
        f"import os\nd = os.open({str(target_dir)!r}, os.O_RDONLY)\nos.open('pwned.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d)",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import shutil\nshutil.copyfile('main.py', {str(target)!r})",
        f"import os\nos.mkfifo({str(target)!r})",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
    ):
        v = verdict(program, isolation=isolation)
        assert not v.correct, (program, v)
        assert not target.exists(), program


@pytest.mark.parametrize("isolation", LEVELS)
def test_delete_rename_chmod_outside_are_blocked(tmp_path, isolation):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o644)
    for program in (
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'mine.txt')",
        f"import os\nos.chmod({str(victim)!r}, 0o777)",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.truncate({str(victim)!r}, 0)",
    ):
        assert not verdict(program, isolation=isolation).correct
        assert victim.read_text() == "keep me" and (victim.stat().st_mode & 0o777) == 0o644, program


@pytest.mark.parametrize("isolation", LEVELS)
def test_socket_connect_to_a_local_listener_is_blocked(isolation):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        for program in (
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'hi')",
            f"import socket\nsocket.create_connection(('localhost', {port}), timeout=1)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
            # swallowing the PermissionError does not hide the attempt
            f"import socket\ntry:\n    socket.socket().connect(('127.0.0.1', {port}))\nexcept Exception:\n    pass",
        ):
            assert_limit(verdict(program, isolation=isolation), "network")
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever connected
    finally:
        server.close()


def test_huge_output_is_capped():
    r = run_sandboxed("while True:\n    print('x' * 1000)", max_output_bytes=10_000, **FAST)
    assert r.limit_hit == "output" and len(r.stdout) <= 10_000
    r = run_sandboxed("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)", max_output_bytes=10_000, **FAST)
    assert r.limit_hit == "output" and len(r.stderr) <= 10_000
    assert_limit(verdict("while True:\n    print('x' * 1000)", max_output_bytes=10_000), "output")


@pytest.mark.parametrize("isolation", LEVELS)
def test_killing_the_parent_is_blocked(isolation):
    me = os.getpid()
    for program in (
        "import os\nos.kill(os.getppid(), 9)",
        f"import os\nos.kill({me}, 9)",
        f"import os\nos.killpg({os.getpgid(me)}, 9)",
        "import os\nos.killpg(0, 9)",
        f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({me}), 9)",
        "import signal, threading\nsignal.pthread_kill(threading.get_ident(), signal.SIGUSR1)",
    ):
        assert_limit(verdict(program, isolation=isolation), "signal")
    os.kill(me, 0)  # still alive
    assert verdict(ADD, ["assert add(1, 1) == 2"], isolation=isolation).correct  # and it still works


def test_ctypes_and_other_escapes_are_forbidden():
    for program in (
        "import ctypes\nctypes.CDLL(None).kill(0, 9)",
        "import importlib\nimportlib.import_module('ctypes')",
        "import _ctypes",
        "import _xxsubinterpreters as i\ni.run_string(i.create(), 'import os; os.kill(0, 9)')",
        "import gc\nprint(len(gc.get_objects()))",
        "import sys\nsys.settrace(lambda *a: None)",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import sys\ndel sys.modules['posix']\nimport posix",
    ):
        assert_limit(verdict(program), "forbidden")
    assert verdict("import ctypes").reason == "limit: forbidden (import ctypes)"


@pytest.mark.parametrize("isolation", LEVELS)
def test_env_secrets_are_not_inherited(monkeypatch, isolation):
    monkeypatch.setenv("ALIGNKIT_SECRET", "hunter2")
    me = os.getpid()
    program = (
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('ALIGNKIT_SECRET'))\n"
        f"try:\n    print(open('/proc/{me}/environ').read())\nexcept OSError as e:\n    print(type(e).__name__)\n"
    )
    r = run_sandboxed(program, isolation=isolation, **FAST)
    assert "hunter2" not in r.stdout + r.stderr
    assert "ALIGNKIT_SECRET" not in r.stdout
    assert r.stdout.splitlines()[1] == "None"


def test_faked_reports_and_early_exits_do_not_pass():
    tests = ["assert solve() == 42", "assert solve() == 43"]
    for program in (
        "def solve():\n    return 0\nprint('R P P')\nprint('ok: 2/2 tests passed')",
        "import os\ndef solve():\n    return 0\nos._exit(0)",
        "import atexit, os\ndef solve():\n    return 0\natexit.register(lambda: os._exit(0))",
        "import sys\nsys.stderr.write('alignkit-sandbox: everything passed\\n')\ndef solve():\n    return 0",
        # a report written by the program itself (the descriptor found by scanning): answers, compared here
        "import os\ndef solve():\n    return 0\nfor fd in range(3, 20):\n    try:\n        os.write(fd, b'R V i2a V i2b\\n')\n"
        "    except OSError:\n        pass\n",
    ):
        v = verdict(program, tests)
        assert not v.correct and v.score < 1.0, (program, v)


def test_hook_reads_no_global_names():
    """The audit hook may not look anything up in globals or builtins (the program could patch them)."""
    hook = next(c for c in sandbox_child._build_hook.__code__.co_consts if hasattr(c, "co_code") and c.co_name == "_audit")
    loads = [i.argval for i in dis.get_instructions(hook) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
    assert loads == []


# ------------------------------------------------------------------------------ the isolation ladder


def test_strict_refuses_without_the_boundary(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_BWRAP", "")
    with pytest.raises(SandboxUnavailableError, match="strict.*refuses"):
        CodeVerifier(isolation="strict")
    with pytest.raises(SandboxUnavailableError):
        run_sandboxed("print(1)", isolation="strict")
    with pytest.raises(ValueError, match="isolation"):
        CodeVerifier(isolation="namespaces")


def test_auto_fallback_warns_and_records(monkeypatch, caplog):
    monkeypatch.setenv("ALIGNKIT_BWRAP", "")
    with caplog.at_level(logging.WARNING, logger="alignkit.verifiers.sandbox"):
        boundary, reason = resolve_isolation("auto")
    assert boundary is None and "ALIGNKIT_BWRAP" in reason
    v = verdict(ADD, ["assert add(1, 2) == 3"], isolation="auto")
    assert v.correct
    assert v.reason == f"ok: 1/1 tests passed [isolation: none, the kernel boundary is unavailable: {reason}]"
    r = run_sandboxed("print(1)", isolation="auto", **FAST)
    assert (r.isolation, r.fallback, r.boundary) == ("none", reason, "")
    # none: no boundary, asked for; nothing recorded as a fallback
    r = run_sandboxed("print(1)", isolation="none", **FAST)
    assert (r.isolation, r.fallback) == ("none", None)


def test_auto_fallback_warning_is_logged(monkeypatch, caplog):
    monkeypatch.setenv("ALIGNKIT_BWRAP", "/nonexistent/bwrap-for-this-test")
    with caplog.at_level(logging.WARNING, logger="alignkit.verifiers.sandbox"):
        resolve_isolation("auto")
    assert any("WITHOUT it" in rec.getMessage() for rec in caplog.records)


@NEEDS_BOUNDARY
def test_auto_uses_the_boundary_where_it_works():
    r = run_sandboxed("print(1)", isolation="auto", **FAST)
    assert (r.isolation, r.fallback) == ("strict", None) and r.boundary == BOUNDARY.describe()


# ------------------------------------------------------------------------------ the kernel boundary


@NEEDS_BOUNDARY
def test_boundary_view_of_the_machine():
    program = (
        "import os\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
        "print(os.getuid(), os.getgid(), os.getpid())\n"
        "print(status['CapEff'].strip(), status['NoNewPrivs'].strip(), status['Seccomp'].strip())\n"
        "print(sorted(os.listdir('/')))\n"
        f"print(os.path.exists('/etc/passwd'), os.path.exists('/home'), os.path.exists({PACKAGE_DIR!r}))\n"
        "open('/tmp/mine', 'w').write('x'); open('/dev/shm/mine', 'w').write('x')\n"
        "print(open('/tmp/mine').read(), os.access('/usr', os.W_OK))\n"
    )
    r = run_sandboxed(program, isolation="strict", **FAST)
    assert r.ok, r.stderr
    ids, caps, listing, missing, writes = r.stdout.splitlines()
    uid, gid, pid = map(int, ids.split())
    if BOUNDARY.as_root:
        assert UID_BASE <= uid < UID_BASE + UID_RANGE and gid == uid  # a throwaway uid, not root
    assert uid != 0 and pid <= 2  # a PID namespace of its own
    eff, nnp, seccomp = caps.split()
    assert int(eff, 16) == 0 and nnp == "1"
    assert seccomp == ("2" if BOUNDARY.seccomp is not None else "0")
    assert "home" not in listing and "var" not in listing and "run" not in listing
    assert missing == "False False False"
    assert writes == "x False"
    assert not os.path.exists("/tmp/mine") and not os.path.exists("/dev/shm/mine")  # private /tmp and /dev/shm


@NEEDS_BOUNDARY
def test_boundary_holds_where_the_hook_is_bypassed(tmp_path):
    """A second copy of _posixsubprocess gets past the audit hook; the kernel boundary still holds."""
    canary = tmp_path / "canary"
    canary.mkdir()
    canary.chmod(0o1777)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    unix_path = str(tmp_path / "s")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen(5)
    unix.settimeout(0.2)
    program = FORK_EXEC + f"""
import time
spawn(["/bin/sh", "-c", "echo x > {canary}/shell; cat /etc/shadow; kill -9 -1"])
spawn([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"])
spawn([sys.executable, "-c", "import socket; s = socket.socket(socket.AF_UNIX); s.connect({unix_path!r})"])
spawn(["/bin/sh", "-c", "sleep 3; echo late > {canary}/late"], setsid=True)
time.sleep(0.5)
def add(a, b):
    return a + b
"""
    try:
        r = run_sandboxed(program, isolation="strict", cpu_seconds=2, wall_seconds=4, memory_mb=256)
        assert "root:" not in r.stdout + r.stderr
        for listener in (server, unix):
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        server.close()
        unix.close()
    assert list(canary.iterdir()) == []
    # the setsid sleeper died with the sandbox: the autouse fixture finds no process left


@NEEDS_BOUNDARY
@pytest.mark.skipif(BOUNDARY.available and BOUNDARY.cgroups is None, reason=f"no cgroups here: {BOUNDARY.cgroup_note}")
def test_boundary_limits_tasks_and_memory():
    program = (
        "import threading, time\nthreading.stack_size(64 * 1024)\nn = 0\n"
        "try:\n    for _ in range(200):\n        threading.Thread(target=time.sleep, args=(1,), daemon=True).start()\n"
        "        n += 1\nexcept RuntimeError:\n    pass\nprint(n)\n"
    )
    r = run_sandboxed(program, isolation="strict", max_processes=8, cpu_seconds=2, wall_seconds=4)
    assert int(r.stdout.split()[0]) <= 7  # the main thread plus at most 7
    # tmpfs pages count against the run's memory cgroup: 3 x 60 MB of files in a 64 MB (+ slack) cgroup
    program = "for i in range(3):\n    open(f'f{i}', 'wb').write(b'x' * (60 << 20))\n"
    r = run_sandboxed(program, isolation="strict", memory_mb=64, file_size_mb=64, cpu_seconds=5, wall_seconds=10)
    assert r.limit_hit == "memory", r


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3")
                    or not BOUNDARY.available, reason="needs root (to become an ordinary user), setpriv and /usr/bin/python3")
def test_boundary_as_an_ordinary_user(tmp_path):
    """Not root: bwrap makes an unprivileged user namespace; the program runs as that user."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = (
        f"import sys, os; sys.path.insert(0, {repo!r})\n"
        "from alignkit.verifiers.sandbox_boundary import get_boundary\n"
        "from alignkit.verifiers.sandbox import run_sandboxed, Step\n"
        "b = get_boundary()\n"
        "if not b.available:\n    print('UNAVAILABLE', b.reason); raise SystemExit(0)\n"
        "r = run_sandboxed('import os\\ndef add(a, b):\\n    return a + b\\nprint(os.getuid(), sorted(os.listdir(\"/\")))',"
        " steps=[Step('eval', 'add(2, 3)')], isolation='strict')\n"
        "print(r.isolation, r.steps[0].value, r.stdout.strip())\n"
    )
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", probe],
                         capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("UNAVAILABLE"):
        pytest.skip(f"unprivileged user namespaces are not allowed here: {out.stdout}")
    isolation, value, uid, *listing = out.stdout.split()
    assert (isolation, value, uid) == ("strict", "5", "65534")
    assert "'root'" not in " ".join(listing) and "'home'" not in " ".join(listing)


# ------------------------------------------------------------------------------ the verifier


def test_extract_program():
    assert extract_program("x = 1") == "x = 1"
    text = "Try:\n```python\nx = 1\n```\nBetter:\n```py\nx = 2\n```\nShell:\n```bash\nls\n```\n"
    assert extract_program(text) == "x = 2\n"
    assert extract_program("```\ny = 3\n```") == "y = 3\n"
    assert extract_program("intro\n```python\nz = 4\n") == "z = 4\n"  # cut short


def test_registered_and_configurable():
    v = get_verifier("code", cpu_seconds=1, timeout=2, memory_mb=128, num_workers=2, isolation="none",
                     max_processes=4, in_process_tests=False)
    assert isinstance(v, CodeVerifier)
    assert (v.cpu_seconds, v.wall_seconds, v.timeout, v.memory_mb, v.num_workers) == (1.0, 2.0, 2.0, 128, 2)
    assert (v.isolation, v.max_processes, v.in_process_tests) == ("none", 4, False)
    loop = ["for i in range(3):\n    assert add(i, 0) == i", "assert add(1, 1) == 2"]
    got = v.verify({"tests": loop}, ADD)
    assert not got.correct and got.score == 0.5 and "NotJudgeable" in got.reason


def test_verify_batch_keeps_order_and_is_bounded():
    good = ("def f(x):\n    return x + 1", ["assert f(1) == 2", "assert f(2) == 3"])
    bad = ("def f(x):\n    return x", ["assert f(1) == 2"])
    partial = ("def f(x):\n    return 2", ["assert f(1) == 2", "assert f(2) == 3"])
    slow = ("import time\ntime.sleep(100)", ["assert True"])
    net = ("import socket\nsocket.socket()", None)
    pool = [good, bad, partial, good, good, net, good, bad, good, slow]
    items = [pool[i % len(pool)] for i in range(40)]
    problems = [{"prompt": str(i), **({"tests": t} if t is not None else {})} for i, (_, t) in enumerate(items)]
    completions = [f"```python\n{src}\n```" for src, _ in items]
    verifier = CodeVerifier(cpu_seconds=1, wall_seconds=1.5, memory_mb=256, num_workers=2, isolation=DEFAULT_LEVEL)
    start = time.monotonic()
    verdicts = verifier.verify_batch(problems, completions)
    elapsed = time.monotonic() - start
    assert len(verdicts) == 40
    for (src, tests), v in zip(items, verdicts):
        if (src, tests) == good:
            assert v == Verdict(True, 1.0, "ok: 2/2 tests passed")
        elif (src, tests) == bad:
            assert not v.correct and v.score == 0.0 and "AssertionError" in v.reason
        elif (src, tests) == partial:
            assert not v.correct and v.score == 0.5
        elif (src, tests) == slow:
            assert_limit(v, "wall_time")
        else:
            assert_limit(v, "network")
    # 4 sleepers at 1.5 s each over 2 workers plus 36 quick programs: bounded well below serial time
    assert elapsed < 20, elapsed
    with pytest.raises(ValueError):
        verifier.verify_batch(problems[:2], completions[:1])


def test_results_type():
    r = run_sandboxed("print('hi')", **FAST)
    assert isinstance(r, SandboxResult)
    assert (r.returncode, r.stdout, r.stderr, r.timed_out, r.limit_hit) == (0, "hi\n", "", False, None)
    assert r.duration_s > 0 and r.isolation in ("strict", "none")
    assert r.isolation == ("strict" if BOUNDARY.available else "none")


def test_python_other_than_this_one(tmp_path):
    """A venv of its own: its site-packages is what the program sees (and, under the boundary, read-only)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=120)
    python = str(venv / "bin" / "python")
    for isolation in (["strict"] if BOUNDARY.available else []) + ["none"]:
        v = CodeVerifier(python=python, isolation=isolation, **FAST)
        result, plan = v.run({"tests": ["assert add(2, 2) == 4"]}, ADD + "\nimport sys\nprint(sys.path[-1])")
        assert v.judge({"tests": ["assert add(2, 2) == 4"]}, result, plan).correct
        assert result.stdout.strip().startswith(str(venv) + "/lib/")
