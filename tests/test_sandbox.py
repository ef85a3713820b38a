"""The sandboxed code verifier against a hostile corpus, plus the programs it must let through.

Every hostile program must be contained, marked incorrect with the limit named, and leave nothing
behind: the autouse fixture points ``tempfile`` at a private directory and checks that it is empty
and that this process has no child processes left after each test. Limits are small (1 s of CPU,
2 s of wall time) so the whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import dis
import os
import socket
import tempfile
import time

import pytest

from alignkit.verifiers import get_verifier
from alignkit.verifiers.base import Verdict
from alignkit.verifiers.code import CodeVerifier, extract_program
from alignkit.verifiers.sandbox import _PRELUDE, SandboxResult, isolation_mode, run_sandboxed

FAST = {"cpu_seconds": 1, "wall_seconds": 2, "memory_mb": 256}
ISOLATIONS = ["auto"] + (["none"] if isolation_mode()[0] != "none" else [])


def _children() -> list[int]:
    """PIDs of this process's live (non-zombie) descendants."""
    try:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except ImportError:  # pragma: no cover
        me, out, parents = os.getpid(), [], {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    parents[int(entry)] = (int(fields[1]), fields[0])
                except OSError:
                    pass
        frontier = {me}
        while frontier:
            kids = {pid for pid, (ppid, state) in parents.items() if ppid in frontier and state != "Z"}
            out += kids
            frontier = kids
        return out


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path, monkeypatch):
    """Sandboxes go to a private temp dir, which must be empty afterwards; no child may survive."""
    sandboxes = tmp_path / "sandboxes"
    sandboxes.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandboxes))
    before = set(_children())
    yield sandboxes
    leftover = [p for p in _children() if p not in before]
    for _ in range(20):  # a killed process may take a moment to be gone from /proc
        if not leftover:
            break
        time.sleep(0.05)
        leftover = [p for p in _children() if p not in before]
    assert leftover == [], f"processes left behind: {leftover}"
    assert list(sandboxes.iterdir()) == [], "sandbox temp dirs left behind"


def verdict(program: str, tests=None, **kwargs) -> Verdict:
    problem = {"prompt": "p"}
    if tests is not None:
        problem["tests"] = tests
    problem.update(kwargs.pop("problem", {}))
    options = {**FAST, **kwargs}
    return CodeVerifier(**options).verify(problem, f"Here you go:\n```python\n{program}\n```\n")


def assert_limit(v: Verdict, kind: str):
    assert not v.correct and v.score == 0.0, v
    assert v.reason.startswith(f"limit: {kind}"), v


# ------------------------------------------------------------------------------ correct programs


def test_correct_function_with_asserts_passes():
    v = verdict("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert v == Verdict(True, 1.0, "ok: 2/2 tests passed")


def test_partial_score_two_of_three():
    v = verdict("def sq(x):\n    return x * x if x < 10 else 0", ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(10) == 100"])
    assert not v.correct
    assert v.score == pytest.approx(2 / 3)
    assert "test 3 of 3 failed" in v.reason and "sq(10)" in v.reason and "AssertionError" in v.reason


def test_text_test_program_and_stdin():
    program = "import sys\ndef total(xs):\n    return sum(xs)\nif __name__ == '__main__':\n    print(total(map(int, sys.stdin.read().split())))"
    test_program = "def check(f):\n    assert f([1, 2]) == 3\n    assert f([]) == 0\nif __name__ == '__main__':\n    check(total)\n    print('checked')"
    v = verdict(program, test_program)
    assert v == Verdict(True, 1.0, "ok: the test program passed")
    # stdin + expected answer, no tests: the main block runs and reads standard input
    v = verdict(program, problem={"stdin": "4 5 6\n", "answer": 15})
    assert v == Verdict(True, 1.0, "ok: output matches the answer")
    v = verdict(program, problem={"stdin": "4 5\n", "answer": 15})
    assert not v.correct and v.reason.startswith("wrong output")
    r = run_sandboxed("print(input()[::-1])", stdin="abc\n", **FAST)
    assert r.ok and r.stdout == "cba\n"


def test_syntax_error_and_exception_are_incorrect():
    v = verdict("def f(:\n    pass", ["assert f() is None"])
    assert not v.correct and v.score == 0.0 and "SyntaxError" in v.reason
    v = verdict("def f():\n    return 1 / 0\nf()", ["assert True"])
    assert not v.correct and "ZeroDivisionError" in v.reason
    v = verdict("def f():\n    return 1 / 0", ["assert f() == 1", "assert 1 == 1"])
    assert not v.correct and v.score == 0.5 and "ZeroDivisionError: division by zero" in v.reason


def test_common_libraries_are_not_flagged():
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
    r = run_sandboxed(program, cpu_seconds=5, wall_seconds=10)
    assert r.ok, (r.limit_hit, r.blocked, r.stderr)
    assert r.stdout.splitlines()[-1] == "6"


# ------------------------------------------------------------------------------ hostile programs


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_fork_bomb_os_fork(isolation):
    v = verdict("import os\nwhile True:\n    os.fork()", ["assert True"], isolation=isolation)
    assert_limit(v, "processes")
    v = verdict("import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()", isolation=isolation)
    assert_limit(v, "processes")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_fork_bomb_subprocess_popen(isolation):
    v = verdict("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])", isolation=isolation)
    assert_limit(v, "processes")
    v = verdict("import os\nos.system('sleep 100 &')", isolation=isolation)
    assert_limit(v, "processes")
    # the module's own fork primitive, which raises no audit event, is stubbed out
    r = run_sandboxed("import _posixsubprocess\n_posixsubprocess.fork_exec()", **FAST)
    assert r.limit_hit == "processes"


def test_infinite_loop_hits_cpu_limit():
    start = time.monotonic()
    v = verdict("while True:\n    pass", ["assert True"], wall_seconds=10)  # CPU, not wall, must stop it
    assert_limit(v, "cpu_time")
    assert time.monotonic() - start < 6  # 1 s of CPU; slack for a loaded machine
    # ignoring SIGXCPU only buys the second before the hard limit's SIGKILL
    v = verdict("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass", wall_seconds=10)
    assert_limit(v, "cpu_time")
    assert time.monotonic() - start < 12


def test_sleep_hits_wall_limit():
    start = time.monotonic()
    r = run_sandboxed("import time\ntime.sleep(1000)", **FAST)
    assert r.timed_out and r.limit_hit == "wall_time"
    assert 1.9 < r.duration_s < 4 and time.monotonic() - start < 5


def test_memory_bombs():
    assert_limit(verdict("x = bytearray(10**10)"), "memory")
    start = time.monotonic()
    assert_limit(verdict("x = []\nwhile True:\n    x.append(bytearray(10**6))", wall_seconds=10), "memory")
    assert_limit(verdict("x = []\nwhile True:\n    x.append([0] * 1000)", cpu_seconds=3, wall_seconds=10), "memory")
    assert time.monotonic() - start < 15


def test_file_size_limit():
    r = run_sandboxed("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)", file_size_mb=4, **FAST)
    assert r.limit_hit == "file_size"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_write_outside_the_sandbox_is_blocked(tmp_path, isolation):
    target = tmp_path / "pwned.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('pwned.txt', 'a').write('x')",
        f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('pwned.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d)",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import shutil\nshutil.copyfile('main.py', {str(target)!r})",
        f"import os\nos.mkfifo({str(target)!r})",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
    ):
        v = verdict(program, isolation=isolation)
        assert_limit(v, "filesystem")
        assert not target.exists(), program


@pytest.mark.parametrize("isolation", ISOLATIONS)
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
        assert_limit(verdict(program, isolation=isolation), "filesystem")
        assert victim.read_text() == "keep me" and (victim.stat().st_mode & 0o777) == 0o644, program


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_socket_connect_to_a_local_listener_is_blocked(isolation):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        programs = (
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'hi')",
            f"import socket\nsocket.create_connection(('localhost', {port}), timeout=1)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
            # swallowing the PermissionError does not hide the attempt
            f"import socket\ntry:\n    socket.socket().connect(('127.0.0.1', {port}))\nexcept Exception:\n    pass",
        )
        for program in programs:
            assert_limit(verdict(program, isolation=isolation), "network")
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever connected
    finally:
        server.close()


def test_huge_output_is_capped():
    start = time.monotonic()
    r = run_sandboxed("while True:\n    print('x' * 1000)", max_output_bytes=10_000, **FAST)
    assert r.limit_hit == "output" and len(r.stdout) <= 10_000
    r = run_sandboxed("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)", max_output_bytes=10_000, **FAST)
    assert r.limit_hit == "output" and len(r.stderr) <= 10_000
    assert time.monotonic() - start < 5
    v = verdict("while True:\n    print('x' * 1000)", max_output_bytes=10_000)
    assert_limit(v, "output")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_killing_the_parent_is_blocked(isolation):
    me = os.getpid()
    for program in (
        "import os\nos.kill(os.getppid(), 9)",
        f"import os\nos.kill({me}, 9)",
        f"import os\nos.killpg({os.getpgid(me)}, 9)",
        "import os\nos.killpg(0, 9)",
        f"import os, signal\nos.kill({me}, signal.SIGTERM)",
        f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({me}), 9)",
        "import signal, threading\nsignal.pthread_kill(threading.get_ident(), signal.SIGUSR1)",
        # os.kill(-1) signals every process the user may signal: only tried inside a PID namespace
        *(["import os\nos.kill(-1, 9)"] if isolation == "auto" and isolation_mode()[0] == "namespaces" else []),
    ):
        assert_limit(verdict(program, isolation=isolation), "signal")
    os.kill(me, 0)  # still alive
    assert verdict("def f():\n    return 1", ["assert f() == 1"], isolation=isolation).correct  # and it still works


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


def test_env_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_SECRET", "hunter2")
    me = os.getpid()
    program = (
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('ALIGNKIT_SECRET'))\n"
        f"try:\n    print(open('/proc/{me}/environ').read())\nexcept OSError as e:\n    print(type(e).__name__)\n"
    )
    for isolation in ISOLATIONS:
        r = run_sandboxed(program, isolation=isolation, **FAST)
        assert "hunter2" not in r.stdout + r.stderr
        assert "ALIGNKIT_SECRET" not in r.stdout
        assert r.stdout.splitlines()[1] == "None"


def test_faked_summaries_and_early_exits_do_not_pass():
    tests = ["assert solve() == 42", "assert solve() == 43"]
    for program in (
        "def solve():\n    return 0\nprint('R 0000 P,P')\nprint('ok: 2/2 tests passed')",
        "import sys\ndef solve():\n    return 0\nsys.exit(0)",
        "import os\ndef solve():\n    return 0\nos._exit(0)",
        "import atexit, os\ndef solve():\n    return 0\natexit.register(lambda: os._exit(0))",
        "import sys\nsys.stderr.write('alignkit-sandbox: everything passed\\n')\ndef solve():\n    return 0",
    ):
        v = verdict(program, tests)
        assert not v.correct, (program, v)
        assert v.score < 1.0


def test_hook_reads_no_global_names():
    """The audit hook may not look anything up in globals or builtins (the program could patch them)."""
    code = compile(_PRELUDE, "<prelude>", "exec")

    def find(co, name):
        for const in co.co_consts:
            if hasattr(const, "co_code"):
                if const.co_name == name:
                    return const
                found = find(const, name)
                if found is not None:
                    return found
        return None

    hook = find(code, "_audit")
    assert hook is not None
    loads = [i.argval for i in dis.get_instructions(hook) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
    assert loads == []


# ------------------------------------------------------------------------------ the verifier


def test_extract_program():
    assert extract_program("x = 1") == "x = 1"
    text = "Try:\n```python\nx = 1\n```\nBetter:\n```py\nx = 2\n```\nShell:\n```bash\nls\n```\n"
    assert extract_program(text) == "x = 2\n"
    assert extract_program("```\ny = 3\n```") == "y = 3\n"
    assert extract_program("intro\n```python\nz = 4\n") == "z = 4\n"  # cut short


def test_registered_and_configurable():
    v = get_verifier("code", cpu_seconds=1, timeout=2, memory_mb=128, num_workers=2)
    assert isinstance(v, CodeVerifier)
    assert (v.cpu_seconds, v.wall_seconds, v.timeout, v.memory_mb, v.num_workers) == (1.0, 2.0, 2.0, 128, 2)


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
    verifier = CodeVerifier(cpu_seconds=1, wall_seconds=1.5, memory_mb=256, num_workers=2)
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
    assert elapsed < 12, elapsed
    with pytest.raises(ValueError):
        verifier.verify_batch(problems[:2], completions[:1])


def test_results_type():
    r = run_sandboxed("print('hi')", **FAST)
    assert isinstance(r, SandboxResult)
    assert (r.returncode, r.stdout, r.stderr, r.timed_out, r.limit_hit) == (0, "hi\n", "", False, None)
    assert r.duration_s > 0 and r.isolation in ("namespaces", "net", "none")
