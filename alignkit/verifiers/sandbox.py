"""Run untrusted Python in a contained subprocess: :func:`run_sandboxed` -> :class:`SandboxResult`.

Layers, from the outside in (each one is there because the ones inside it can be bypassed):

1. **Linux namespaces** (optional; used when ``unshare`` works, probed once per interpreter): a new
   user namespace (so the child cannot raise its hard rlimits or create device nodes even when the
   parent runs as root), a network namespace with no interfaces up (no network at all), a PID
   namespace with its own ``/proc`` (the child cannot see or signal any process outside it, and every
   process in it is killed by the kernel when the program exits).
2. **Resource limits** set with ``resource.setrlimit`` before the user code starts: ``RLIMIT_CPU``
   (soft = ``cpu_seconds``, hard one second later), ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_FSIZE``
   (``file_size_mb``), ``RLIMIT_NPROC`` (the user's current task count plus ``max_processes``; the
   kernel does not apply it to root), ``RLIMIT_NOFILE`` and ``RLIMIT_CORE = 0``. They are set by the
   child itself (first thing, before the user's code), not in a ``preexec_fn``: ``preexec_fn`` is not
   safe when the parent has threads, and :class:`~alignkit.verifiers.code.CodeVerifier` runs
   programs from a thread pool.
3. **Process hygiene**: ``python -I -S -B`` (isolated mode, no site hooks, no bytecode writes) in a
   new session, an empty temporary directory as working directory and ``HOME``/``TMPDIR`` (removed
   afterwards, whatever happened), a minimal environment (no inherited variables, so no secrets),
   only the three pipes and two private descriptors open. The wall-clock limit and the output cap
   are enforced by the parent, which kills the whole process group; nothing is left behind.
4. **An audit hook** (:pep:`578`, ``sys.addaudithook``; it cannot be removed once installed)
   installed before the user's code runs. It blocks network use (sockets other than ``AF_UNIX``,
   ``connect``/``bind``/``sendto``/name lookups), process creation (``os.fork``, ``os.exec*``,
   ``os.spawn*``, ``os.posix_spawn``, ``os.system``, ``subprocess.Popen``), signals to other processes
   (``os.kill``, ``os.killpg``, ``signal.pthread_kill``), writes, deletes, renames, ``chmod`` and
   links outside the temporary directory, reads of other processes' ``/proc`` entries, of the
   parent's home directory and of this package's source, ``ctypes``, sub-interpreters, and the
   introspection that would let code reach the hook's state (``gc.get_objects``/``get_referrers``,
   ``sys._current_frames``, ``sys.settrace``/``setprofile``). C functions that raise no audit event
   (``os.pidfd_open``, ``signal.pidfd_send_signal``, ``os.mknod``, ``os.mkfifo``,
   ``_posixsubprocess.fork_exec``, ``os.setpriority``, ``os.sched_set*``) are replaced by stubs that
   refuse. A blocked operation raises ``PermissionError("alignkit-sandbox: blocked <kind>: ...")`` and
   is also reported to the parent on a private pipe, so swallowing the exception does not hide it.

What each :attr:`SandboxResult.limit_hit` means: ``"cpu_time"``, ``"wall_time"``, ``"memory"``
(``MemoryError``), ``"file_size"`` (``SIGXFSZ``/``EFBIG``), ``"output"`` (more than
``max_output_bytes`` on stdout or stderr), ``"network"``, ``"processes"``, ``"filesystem"``,
``"signal"`` (the program tried to signal another process, or died of a signal no limit explains,
e.g. ``SIGSEGV``), ``"forbidden"`` (``ctypes``, sub-interpreters, interpreter introspection, raising
a limit, a forged test report) or ``None``.

**Not a security boundary on its own.** :pep:`578` says so plainly: an audit hook is a tripwire, not a
sandbox, and code that sets out to defeat it (for instance by building a fresh ``posix`` module with
``_imp.create_builtin``, or tampering with ``pathlib`` classes to race the path check) can. What holds
even then is what the kernel enforces: the namespaces (when present) and the rlimits. Writes to the
file system outside the temporary directory are stopped by the hook and by ordinary file
permissions only; when the parent runs as root and no namespaces are available, that is the hook
alone. Run untrusted code as an unprivileged user, or in a container, for a real boundary.

``checks`` (used by the code verifier): snippets run after the program, in its namespace, each in
``try``/``except``, in the same process. The outcome comes back on a private pipe as one line
carrying a random nonce that the child reads only after the program and all checks have finished,
so printing a fake summary, exiting early (``sys.exit(0)``, ``os._exit(0)``) or stubbing the checks
from the program's top level cannot produce a passing report. A program written against this
harness in particular (one that reads the nonce descriptor itself) can still forge one: the checks
run in the program's own process.
"""

from __future__ import annotations

import marshal
import os
import re
import secrets
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

__all__ = ["LIMIT_KINDS", "CheckResult", "SandboxResult", "isolation_mode", "run_sandboxed"]

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

TAG = "alignkit-sandbox"
_REPORT_CAP = 1 << 20  # bytes the parent accepts on the report pipe
_SANDBOX_PREFIX = "alignkit-sandbox-"


@dataclass(frozen=True)
class CheckResult:
    """One check snippet: passed, or the exception type and message it raised."""

    passed: bool
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
    #: one result per check when ``checks`` were given and the harness reported; else ``None``
    checks: tuple[CheckResult, ...] | None = None
    #: ``"namespaces"``, ``"net"`` (network namespace only) or ``"none"``
    isolation: str = "none"

    @property
    def ok(self) -> bool:
        """Exit status 0 and no limit hit."""
        return self.returncode == 0 and self.limit_hit is None


# ------------------------------------------------------------------------------------ the child
#
# The bootstrap (``python -c``) reads the job from a private descriptor and runs _PRELUDE. Rules for
# the audit hook (``_audit`` below): it uses no global or builtin names (everything it needs is a
# closure variable bound to an immutable value or a C function) and calls no Python-level helper, so
# the program cannot patch what it relies on. Paths must be exact ``str``/``bytes``/``int``; a
# path-like object (``pathlib``, or the program's own class, whose ``__fspath__`` could answer
# differently the second time) is refused for writing, and only ``os.fspath``-ed for reading.

_BOOT = (
    "import sys,marshal,posix\n"
    "_f=int(sys.argv[1]);_c=[]\n"
    "while True:\n"
    "    _b=posix.read(_f,1<<20)\n"
    "    if not _b:break\n"
    "    _c.append(_b)\n"
    "posix.close(_f);_j=marshal.loads(b''.join(_c));del _f,_c,_b\n"
    "_g={'__name__':'__alignkit_prelude__','__builtins__':__builtins__}\n"
    "exec(compile(_j['prelude'],'<alignkit-sandbox>','exec'),_g);_g['_alignkit_main'](_j)\n"
)

_PRELUDE = r'''
def _alignkit_main(job):
    import sys, posix, builtins, resource, _signal, _stat, _imp, _sitebuiltins
    import _posixsubprocess

    _write, _exit, _read = posix.write, posix._exit, posix.read
    report_fd, nonce_fd = job["report_fd"], job["nonce_fd"]
    root, cwd = job["root"], job["cwd"]
    tag = job["tag"]

    # ---- 1. resource limits (before anything of the user's runs)
    lim = job["limits"]
    def _setl(res, soft, hard):
        try:
            cur_soft, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            pass
    _setl(resource.RLIMIT_CPU, lim["cpu"], lim["cpu"] + 1)
    _setl(resource.RLIMIT_AS, lim["as"], lim["as"])
    _setl(resource.RLIMIT_FSIZE, lim["fsize"], lim["fsize"])
    _setl(resource.RLIMIT_CORE, 0, 0)
    _setl(resource.RLIMIT_NOFILE, lim["nofile"], lim["nofile"])
    if lim["nproc"] is not None:
        _setl(resource.RLIMIT_NPROC, lim["nproc"], lim["nproc"])
    controlled = frozenset((resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE,
                            resource.RLIMIT_CORE, resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC,
                            resource.RLIMIT_DATA))

    own_pid = posix.getpid()
    try:
        proc_pid = posix.readlink("/proc/self")
    except OSError:
        proc_pid = str(own_pid)

    def _report(kind, what):
        line = "B " + kind + " " + what.encode("utf-8", "replace").hex() + "\n"
        try:
            _write(report_fd, line.encode())
        except OSError:
            pass

    if own_pid == 1:  # PID-namespace init: the kernel drops SIGXCPU's default action, so catch it
        def _on_xcpu(signum, frame, _w=_write, _x=_exit, _fd=report_fd):
            try:
                _w(_fd, b"L cpu_time\n")
            finally:
                _x(128 + signum)
        _signal.signal(_signal.SIGXCPU, _on_xcpu)

    # ---- 2. replace C functions that raise no audit event
    def _stub(kind, name):
        msg = tag + ": blocked " + kind + ": " + name
        def blocked(*args, **kwargs):
            _report(kind, name)
            raise PermissionError(msg)
        blocked.__name__ = name.rpartition(".")[2]
        return blocked
    for name, kind in (("pidfd_open", "signal"), ("mknod", "filesystem"), ("mkfifo", "filesystem"),
                       ("setpriority", "processes"), ("sched_setscheduler", "processes"),
                       ("sched_setparam", "processes"), ("sched_setaffinity", "processes")):
        if hasattr(posix, name):
            setattr(posix, name, _stub(kind, "os." + name))
    if "os" in sys.modules:
        for name in ("pidfd_open", "mknod", "mkfifo", "setpriority", "sched_setscheduler",
                     "sched_setparam", "sched_setaffinity"):
            if hasattr(sys.modules["os"], name):
                setattr(sys.modules["os"], name, getattr(posix, name))
    if hasattr(_signal, "pidfd_send_signal"):
        _signal.pidfd_send_signal = _stub("signal", "signal.pidfd_send_signal")
    _posixsubprocess.fork_exec = _stub("processes", "_posixsubprocess.fork_exec")

    # ---- 3. the interpreter the program expects (-S skipped site: add its builtins and paths)
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    for d in job["site"]:
        if d not in sys.path:
            sys.path.append(d)
    sys.argv = ["main.py"]
    sys.dont_write_bytecode = True

    main_name = job["main_name"]
    mod = type(sys)(main_name)
    g = mod.__dict__
    g["__builtins__"] = builtins
    g["__file__"] = cwd + "/main.py"
    sys.modules["__main__"] = mod
    sys.modules[main_name] = mod

    with open(cwd + "/main.py", "rb") as f:
        source = f.read()
    checks = job["checks"]
    compiled = ()
    if checks is not None:
        for i, src in enumerate(checks):
            try:
                compiled += (compile(src, "<test %d>" % (i + 1), "exec", dont_inherit=True),)
            except BaseException as e:  # SyntaxError, ValueError (null bytes), ...
                compiled += ("F" + type(e).__name__.encode().hex() + "." + str(e)[:300].encode("utf-8", "replace").hex(),)
    posix.chdir(cwd)
    try:
        code = compile(source, "main.py", "exec", dont_inherit=True)
    except BaseException as e:
        sys.__excepthook__(type(e), e.with_traceback(None), None)
        raise SystemExit(1)
    del source, f

    # ---- 4. the audit hook
    def _make_audit(
        _type=type, _str=str, _bytes=bytes, _int=int, _tuple=tuple, _list=list, _len=len,
        _reversed=reversed, _PermissionError=PermissionError, _ModuleNotFoundError=ModuleNotFoundError,
        _OSError=OSError, _Exception=Exception, _lstat=posix.lstat, _statf=posix.stat,
        _readlink=posix.readlink, _getcwd=posix.getcwd, _write=_write, _fspath=posix.fspath,
        _S_ISLNK=_stat.S_ISLNK, _S_ISDIR=_stat.S_ISDIR, report_fd=report_fd, tag=tag,
        root=root, own_pid=own_pid, proc_pid=proc_pid, controlled=controlled,
        deny_read=tuple(job["deny_read"]), deny_read_strict=tuple(job["deny_read_strict"]),
        allow_read=tuple(job["allow_read"]) + tuple(sys.path),
    ):
        O_WRITE = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
        O_DIR = getattr(posix, "O_DIRECTORY", 0) | getattr(posix, "O_PATH", 0)
        AF_UNIX = 1
        ok_write = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/fd/1", "/dev/fd/2",
                              "/proc/self/fd/1", "/proc/self/fd/2"))
        ignore = frozenset(("compile", "exec", "marshal.loads", "marshal.load", "marshal.dumps",
                            "sys._getframe", "object.__getattr__", "object.__setattr__",
                            "object.__delattr__", "code.__new__", "function.__new__",
                            "builtins.input", "builtins.input/result", "time.sleep",
                            "sys.addaudithook", "os.chdir", "os.listxattr", "os.getxattr",
                            "array.__new__", "mmap.__new__", "sys.excepthook", "sys.unraisablehook",
                            "cpython.run_command", "cpython.run_file", "cpython.run_module",
                            "cpython.run_startup", "cpython.run_interactivehook", "locale.setlocale",
                            "glob.glob", "glob.glob/2", "tempfile.mkstemp", "tempfile.mkdtemp",
                            "shutil.copyfile", "shutil.copymode", "shutil.copystat",
                            "shutil.copytree", "shutil.chown", "shutil.move",
                            "shutil.make_archive", "shutil.unpack_archive", "os.walk", "os.fwalk",
                            "pathlib.Path.glob", "pathlib.Path.rglob", "os.getxattr", "os.listdir",
                            "os.scandir", "sqlite3.connect", "sqlite3.connect/handle"))
        network = frozenset((
            "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyaddr",
            "socket.gethostbyname", "socket.getnameinfo", "socket.sendmsg", "socket.sendto",
            "socket.sethostname", "socket.getservbyname", "socket.getservbyport", "urllib.Request",
            "http.client.connect", "http.client.send", "ftplib.connect", "ftplib.sendcmd",
            "smtplib.connect", "smtplib.send", "poplib.connect", "poplib.putline", "imaplib.open",
            "imaplib.send", "nntplib.connect", "nntplib.putline", "telnetlib.Telnet.open",
            "telnetlib.Telnet.write"))
        processes = frozenset(("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
                               "os.system", "subprocess.Popen", "os.startfile", "webbrowser.open",
                               "pty.spawn", "os.add_dll_directory"))
        forbidden = frozenset(("cpython.PyInterpreterState_New",
                               "sys._current_frames", "sys._current_exceptions", "gc.get_objects",
                               "gc.get_referrers", "gc.get_referents", "sys.settrace",
                               "sys.setprofile", "sys.remote_exec", "cpython.remote_debugger_script",
                               "_xxsubinterpreters.create", "sys.monitoring.register_callback"))
        blocked_imports = frozenset(("ctypes", "_ctypes", "_ctypes_test", "_xxsubinterpreters",
                                     "_xxinterpchannels", "_interpreters", "_interpchannels",
                                     "_interpqueues", "_testcapi", "_testinternalcapi",
                                     "_testmultiphase", "_testbuffer", "_testimportmultiple",
                                     "_testclinic", "_testsinglephase", "_xxtestfuzz", "cffi",
                                     "_cffi_backend", "posix", "_signal", "_posixsubprocess",
                                     "_imp", "resource", "_stat"))
        # write-ish events: (index of the path, index of its dir_fd or -1), per path argument
        write_events = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                                  "os.utime", "os.truncate", "os.rename", "shutil.rmtree",
                                  "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
                                  "os.lchmod", "os.symlink", "os.link"))
        root_slash = root + "/"

        def _audit(event, args):
            if event in ignore:
                return
            kind = None
            what = event
            exc = _PermissionError
            if event == "open" or event in write_events:
                if event == "open":
                    path, mode, flags = args[0], args[1], args[2]
                    if _type(flags) is _int and flags >= 0:
                        write = (flags & O_WRITE) != 0
                        want_dir = (flags & O_DIR) != 0
                    else:
                        write = _type(mode) is not _str or mode.strip("rbtU") != ""
                        want_dir = False
                    targets = ((path, write, -1),)
                elif event == "os.rename":
                    targets = ((args[0], True, args[2]), (args[1], True, args[3]))
                elif event == "os.symlink" or event == "os.link":
                    targets = ()
                    kind = "filesystem"
                elif event == "os.truncate" or event == "os.setxattr" or event == "os.removexattr" \
                        or event == "os.chflags" or event == "os.lchflags":
                    targets = ((args[0], True, -1),)
                elif event == "shutil.rmtree":
                    targets = ((args[0], True, args[1]),)
                else:  # os.remove/rmdir (path, dir_fd), mkdir/chmod (path, mode, dir_fd), ...
                    targets = ((args[0], True, args[_len(args) - 1]),)
                for path, write, dir_fd in targets:
                    if kind is not None:
                        break
                    t = _type(path)
                    if t is _int:
                        continue  # an already-open descriptor: it went through this hook
                    if t is _bytes:
                        path = path.decode("utf-8", "surrogateescape")
                    elif t is not _str:
                        if write:  # a path-like could answer differently when asked again
                            kind = "filesystem"
                            what = event + " through a path-like object (pass a str)"
                            break
                        path = _fspath(path)
                    if _type(path) is not _str:
                        kind = "filesystem"
                        break
                    what = event + " " + path
                    if write and path in ok_write:
                        continue
                    if not path.startswith("/"):
                        if "/../" in "/" + path + "/":
                            # '..' from a directory descriptor this hook cannot see: refuse
                            kind = "filesystem"
                            break
                        if _type(dir_fd) is _int and dir_fd >= 0:
                            # only directories inside the sandbox can be opened, and nothing in it
                            # is a symlink (they cannot be made), so this stays inside
                            continue
                        try:
                            base = _getcwd()
                        except _OSError:
                            kind = "filesystem"
                            break
                        path = base + "/" + path
                    # resolve symlinks and '..' (like os.path.realpath, with C calls only)
                    todo = _list(_reversed(path.split("/")))
                    resolved = ""
                    hops = 0
                    while todo:
                        name = todo.pop()
                        if name == "" or name == ".":
                            continue
                        if name == "..":
                            resolved = resolved[: resolved.rfind("/")] if resolved else ""
                            continue
                        candidate = resolved + "/" + name
                        try:
                            st = _lstat(candidate)
                        except _Exception:
                            resolved = candidate
                            continue
                        if _S_ISLNK(st.st_mode):
                            hops += 1
                            if hops > 40:
                                kind = "filesystem"
                                break
                            try:
                                target = _readlink(candidate)
                            except _Exception:
                                resolved = candidate
                                continue
                            if target.startswith("/"):
                                resolved = ""
                            todo.extend(_reversed(target.split("/")))
                        else:
                            resolved = candidate
                    if kind is not None:
                        break
                    if not resolved:
                        resolved = "/"
                    inside = resolved == root or resolved.startswith(root_slash)
                    if write:
                        if not inside:
                            kind = "filesystem"
                            what = event + " " + resolved
                            break
                        continue
                    if inside:
                        continue
                    if resolved.startswith("/proc/"):
                        first = resolved[6:].partition("/")[0]
                        if first.isdigit() and first != proc_pid:
                            kind = "filesystem"
                            what = event + " " + resolved
                            break
                    denied = False
                    for d in deny_read_strict:
                        if resolved == d or resolved.startswith(d + "/"):
                            denied = True
                            break
                    if not denied:
                        for d in deny_read:
                            if resolved == d or resolved.startswith(d + "/"):
                                denied = True
                                for a in allow_read:
                                    if a and (resolved == a or resolved.startswith(a + "/")):
                                        denied = False
                                        break
                                break
                    if denied:
                        kind = "filesystem"
                        what = event + " " + resolved
                        break
                    if want_dir:
                        kind = "filesystem"
                        what = event + " directory descriptor " + resolved
                        break
                    try:
                        if _S_ISDIR(_statf(resolved).st_mode):
                            kind = "filesystem"
                            what = event + " directory descriptor " + resolved
                            break
                    except _Exception:
                        pass
                if kind is None:
                    return
            elif event == "import":
                name = args[0]
                if _type(name) is _str and name.partition(".")[0] in blocked_imports:
                    raise _ModuleNotFoundError(tag + ": blocked forbidden: import " + name)
                return
            elif event.startswith("socket."):
                if event == "socket.__new__":
                    if args[1] == AF_UNIX:
                        return
                    kind = "network"
                    what = "socket.__new__ family " + _str(args[1])
                elif event == "socket.gethostname":
                    return
                else:
                    kind = "network"
            elif event in network:
                kind = "network"
            elif event in processes:
                kind = "processes"
            elif event == "os.kill":
                if _type(args[0]) is _int and args[0] == own_pid:
                    return
                kind = "signal"
                what = "os.kill " + _str(args[0])
            elif event == "os.killpg" or event == "signal.pthread_kill" or event == "os.pidfd_open":
                kind = "signal"
            elif event.startswith("ctypes.") or event in forbidden:
                kind = "forbidden"
            elif event == "resource.setrlimit":
                if args[0] in controlled:
                    kind = "forbidden"
                    what = "resource.setrlimit " + _str(args[0])
                else:
                    return
            elif event == "resource.prlimit":
                if args[0] != 0 and args[0] != own_pid:
                    kind = "signal"
                elif args[2] is not None and args[1] in controlled:
                    kind = "forbidden"
                else:
                    return
            else:
                return
            line = "B " + kind + " " + what.encode("utf-8", "replace").hex() + "\n"
            try:
                _write(report_fd, line.encode())
            except _OSError:
                pass
            raise exc(tag + ": blocked " + kind + ": " + what)

        return _audit

    sys.addaudithook(_make_audit())
    has_checks = checks is not None
    job.clear()  # the bootstrap's module still refers to it: leave the program nothing to read
    del _make_audit, checks, lim

    # ---- 5. run the program, then the checks
    _exec, _type, _str, _len, _BaseException, _SystemExit = exec, type, str, len, BaseException, SystemExit
    _excepthook, _sys = sys.__excepthook__, sys
    try:
        _exec(code, g)
    except _SystemExit:
        raise
    except _BaseException as e:
        tb = e.__traceback__
        tb = tb.tb_next if tb is not None else None  # drop this frame: show the program's only
        try:
            e = e.with_traceback(tb)
        except _BaseException:
            pass
        _excepthook(_type(e), e, tb)
        raise _SystemExit(1)
    if not has_checks:
        return

    threading = _sys.modules.get("threading")
    if threading is not None:  # a program that runs its main() in a thread
        try:
            current = threading.current_thread()
            for t in threading.enumerate():
                if t is not current and not t.daemon:
                    t.join()
        except _BaseException:
            pass
    g["__name__"] = "__main__"  # the tests' own `if __name__ == "__main__":` blocks run
    results = ()
    for c in compiled:
        if _type(c) is _str:
            results += (c,)
            continue
        try:
            _exec(c, g)
            results += ("P",)
        except _BaseException as e:
            try:
                tname = _type(e).__name__
                tname = tname.encode("utf-8", "replace").hex() if _type(tname) is _str else ""
            except _BaseException:
                tname = ""
            try:
                msg = _str(e)
                msg = msg[:300].encode("utf-8", "replace").hex() if _type(msg) is _str else ""
            except _BaseException:
                msg = ""
            results += ("F" + tname + "." + msg,)
    for stream in (_sys.stdout, _sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    nonce = _read(nonce_fd, 64)
    data = b"R " + nonce + b" " + ",".join(results).encode() + b"\n"
    while data:
        data = data[_write(report_fd, data):]
    _exit(0 if results.count("P") == _len(results) else 1)
'''


# ------------------------------------------------------------------------------------ the parent

_isolation_lock = threading.Lock()
_isolation_cache: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
_site_cache: dict[str, tuple[str, ...]] = {}

_NAMESPACE_PREFIXES = (
    ("namespaces", ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--kill-child")),
    ("net", ("unshare", "--user", "--map-root-user", "--net")),
)


def isolation_mode(python: str = sys.executable, isolation: str = "auto") -> tuple[str, tuple[str, ...]]:
    """The namespace layer this machine supports: ``(name, command prefix)``, probed once.

    ``isolation``: ``"auto"`` (the strongest that works), ``"namespaces"``, ``"net"`` or ``"none"``;
    a named layer that does not work raises ``RuntimeError``.
    """
    if isolation == "none":
        return "none", ()
    if isolation not in ("auto", "namespaces", "net"):
        raise ValueError(f"isolation is 'auto', 'namespaces', 'net' or 'none', got {isolation!r}")
    key = (python, isolation)
    with _isolation_lock:
        if key in _isolation_cache:
            return _isolation_cache[key]
        found = ("none", ())
        if shutil.which("unshare") is not None:
            for name, prefix in _NAMESPACE_PREFIXES:
                if isolation not in ("auto", name):
                    continue
                try:
                    probe = subprocess.run(
                        [*prefix, python, "-I", "-S", "-c", "import posix; print(posix.getpid())"],
                        stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False, env={"PATH": "/usr/bin:/bin"},
                    )
                except (OSError, subprocess.SubprocessError):
                    continue
                expected = b"1" if name == "namespaces" else None
                if probe.returncode == 0 and (expected is None or probe.stdout.strip() == expected):
                    found = (name, prefix)
                    break
        if isolation != "auto" and found[0] != isolation:
            raise RuntimeError(f"isolation {isolation!r} does not work on this machine (is `unshare` allowed?)")
        _isolation_cache[key] = found
        return found


def _site_dirs(python: str) -> tuple[str, ...]:
    if python in _site_cache:
        return _site_cache[python]
    if os.path.realpath(python) == os.path.realpath(sys.executable) or python == sys.executable:
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


def _deny_read_paths() -> list[str]:
    """The parent's home directory (readable where the interpreter itself lives there)."""
    home = os.path.expanduser("~")
    if home and home != "/" and os.path.isdir(home):
        return [os.path.realpath(home)]
    return []


def _allow_read_paths(python: str) -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    return sorted(os.path.realpath(p) for p in paths if p)


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


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_BLOCKED_RE = re.compile(TAG + r": blocked (\w+)")
_UNSHARE_SIGKILL = "unshare: sigprocmask unblock failed"


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
    checks: Sequence[str] | None = None,
    main_name: str = "__main__",
    isolation: str = "auto",
    max_open_files: int = 256,
) -> SandboxResult:
    """Run ``source`` as a Python program in a sandbox (see the module docstring) and report.

    ``stdin`` is the program's standard input. ``checks``: snippets run after the program in its
    namespace (one process for all of them), reported in :attr:`SandboxResult.checks`; the program
    then exits 0 only if all passed. ``main_name`` is the program's ``__name__`` (the checks always
    see ``"__main__"``). ``max_processes`` is how many tasks beyond the user's current count
    ``RLIMIT_NPROC`` allows (not enforced by the kernel for root).
    """
    iso_name, prefix = isolation_mode(python, isolation)
    cpu = max(1, int(-(-cpu_seconds // 1)))
    nproc = None
    if os.geteuid() != 0:
        nproc = _user_task_count() + max(1, int(max_processes))
    nonce = secrets.token_hex(16)

    root = os.path.realpath(tempfile.mkdtemp(prefix=_SANDBOX_PREFIX))
    pipes: list[int] = []
    proc = None
    start = time.monotonic()
    try:
        cwd = os.path.join(root, "work")
        home = os.path.join(root, "home")
        tmp = os.path.join(root, "tmp")
        for d in (cwd, home, tmp):
            os.mkdir(d, 0o700)
        with open(os.path.join(cwd, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(source)

        job = {
            "prelude": _PRELUDE,
            "root": root,
            "cwd": cwd,
            "tag": TAG,
            "checks": [str(c) for c in checks] if checks is not None else None,
            "main_name": main_name,
            "site": list(_site_dirs(python)),
            "deny_read": _deny_read_paths(),
            "deny_read_strict": [_PACKAGE_DIR],
            "allow_read": _allow_read_paths(python),
            "limits": {
                "cpu": cpu,
                "as": int(memory_mb) * 1024 * 1024,
                "fsize": int(file_size_mb) * 1024 * 1024,
                "nofile": int(max_open_files),
                "nproc": nproc,
            },
        }

        nonce_r, nonce_w = os.pipe()
        pipes += [nonce_r, nonce_w]
        os.write(nonce_w, nonce.encode())
        os.close(nonce_w)
        pipes.remove(nonce_w)
        report_r, report_w = os.pipe()
        pipes += [report_r, report_w]
        job["nonce_fd"], job["report_fd"] = nonce_r, report_w

        job_file = tempfile.TemporaryFile()
        stdin_file = tempfile.TemporaryFile()
        try:
            job_file.write(marshal.dumps(job))
            job_file.seek(0)
            stdin_file.write(stdin.encode("utf-8", "surrogateescape"))
            stdin_file.seek(0)
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
            cmd = [*prefix, python, "-I", "-S", "-B", "-c", _BOOT, str(job_file.fileno())]
            proc = subprocess.Popen(
                cmd,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
                pass_fds=(job_file.fileno(), nonce_r, report_w),
                close_fds=True,
            )
        finally:
            job_file.close()
            stdin_file.close()
        os.close(report_w)
        pipes.remove(report_w)
        os.close(nonce_r)
        pipes.remove(nonce_r)

        out, err, rep, killed_for, status, rusage = _supervise(
            proc, report_r, start + float(wall_seconds), int(max_output_bytes)
        )
        duration = time.monotonic() - start
    finally:
        if proc is not None and proc.returncode is None:
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
        _rmtree(root)

    returncode = os.waitstatus_to_exitcode(status)
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    if prefix and prefix[0] == "unshare" and returncode == 1 and _UNSHARE_SIGKILL in stderr:
        # `unshare --fork` cannot re-raise SIGKILL on itself when its child died of it
        returncode = -signal.SIGKILL
        stderr = "\n".join(line for line in stderr.splitlines() if _UNSHARE_SIGKILL not in line)
    cpu_used = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0

    blocked: list[str] = []
    blocked_kinds: list[str] = []
    cpu_flag = False
    reports = []
    forged = False
    for line in rep.decode("ascii", "replace").splitlines():
        parts = line.split(" ")
        if parts[0] == "B" and len(parts) == 3:
            try:
                what = bytes.fromhex(parts[2]).decode("utf-8", "replace")
            except ValueError:
                what = "?"
            blocked_kinds.append(parts[1])
            blocked.append(f"{parts[1]}: {what}")
        elif parts[0] == "L" and parts[1:] == ["cpu_time"]:
            cpu_flag = True
        elif parts[0] == "R" and len(parts) == 3:
            if parts[1] == nonce:
                reports.append(parts[2])
            else:
                forged = True
        elif line.strip():
            forged = True
    check_results = None
    if checks is not None and len(reports) == 1 and not forged:
        check_results = _parse_checks(reports[0], len(checks))
        if check_results is None:
            forged = True
    elif len(reports) > 1:
        forged = True
    if forged:
        blocked_kinds.append("forbidden")
        blocked.append("forbidden: a forged or malformed test report")

    limit = _classify(
        killed_for, blocked_kinds, cpu_flag, returncode, cpu_used, cpu, stderr, check_results,
        rusage, memory_mb,
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
        checks=check_results,
        isolation=iso_name,
    )


def _parse_checks(payload: str, expected: int) -> tuple[CheckResult, ...] | None:
    items = payload.split(",") if payload else []
    if len(items) != expected:
        return None
    out = []
    for item in items:
        if item == "P":
            out.append(CheckResult(True))
            continue
        if not item.startswith("F") or "." not in item:
            return None
        tname, _, msg = item[1:].partition(".")
        try:
            out.append(
                CheckResult(False, bytes.fromhex(tname).decode("utf-8", "replace") or None,
                            bytes.fromhex(msg).decode("utf-8", "replace"))
            )
        except ValueError:
            return None
    return tuple(out)


def _classify(killed_for, blocked_kinds, cpu_flag, returncode, cpu_used, cpu_limit, stderr,
              checks, rusage, memory_mb) -> str | None:
    if blocked_kinds:
        return blocked_kinds[0]
    if killed_for is not None:
        return killed_for
    if cpu_flag:
        return "cpu_time"
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
    if checks is not None and any((c.error_type or "").endswith("MemoryError") for c in checks):
        return "memory"
    return None


def _supervise(proc: subprocess.Popen, report_r: int, deadline: float, cap: int):
    """Collect stdout/stderr/report until the process ends or a limit is hit; reap it.

    Returns ``(stdout, stderr, report, killed_for, wait_status, rusage)``.
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
