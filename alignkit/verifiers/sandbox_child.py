"""The program that runs inside the sandbox: limits, an audit hook, the user's program, then the steps.

:mod:`alignkit.verifiers.sandbox` compiles this file once, sends the code object (or, for another
interpreter, the source) to ``python -I -S -B -c BOOT`` on a private descriptor together with the job,
and the bootstrap calls :func:`main`. The file imports only the standard library: the sandbox sees no
alignkit. It is also an ordinary module, so the parent imports :func:`decode_values` from it (one place
for the result format) and tests can call :func:`encode_value` directly.

What the child does, in order:

1. Resource limits (``setrlimit``: CPU, address space, file size, open files, tasks, no core files),
   set by the child itself (``preexec_fn`` is unsafe in a threaded parent).
2. Replace the C functions that raise no audit event (``os.pidfd_open``, ``os.mknod``, ``os.mkfifo``,
   ``_posixsubprocess.fork_exec``, scheduler calls) with stubs that refuse.
3. Write ``main.py`` into the working directory and compile it and the steps.
4. Install the audit hook (:pep:`578`): network, process creation, signals to other processes,
   writes outside the sandbox's own directories, reads of other processes' ``/proc``, of the parent's
   home and of this package, ``ctypes``, sub-interpreters, interpreter introspection. A refused
   operation raises ``PermissionError("alignkit-sandbox: blocked <kind>: ...")`` and is reported on
   the report descriptor at once, so swallowing the exception does not hide it. **The hook is a
   tripwire that names what a program tried, not the boundary**: under ``isolation="strict"`` the
   kernel boundary around this process (:mod:`alignkit.verifiers.sandbox_boundary`) is what holds
   when a program gets past it.
5. Run the program (``SystemExit(0)`` at its top level is a normal end), wait for its non-daemon
   threads, then run the steps in its namespace:

   - ``eval``: evaluate an expression (the program's side of an assertion, e.g. ``add(2, 3)``) and
     report its value as plain data (:func:`encode_value`). The expected value is never sent here:
     the parent compares, so nothing the program does in this process can turn a wrong answer into
     a pass.
   - ``truth``: evaluate an expression and report ``bool()`` of it.
   - ``exec``: run statements in-process (a general test program); passed unless it raised
     (``SystemExit`` with status 0 counts as passing, as ``unittest.main()`` and ``sys.exit(0)``
     end). This result is the program's own word: the parent marks such verdicts.

Report lines (one descriptor, written with ``os.write``): ``H`` (the harness started), ``B <kind>
<hex>`` (a blocked operation), ``L cpu_time``, ``X <status>`` (a deliberate exit) and one ``R ...``
line with a result per step: ``V`` followed by value tokens, ``E<type hex>.<message hex>`` (the
expression raised), ``P`` or ``F<type hex>.<message hex>`` (an ``exec`` step). The program can write
to this descriptor too; the parent accepts at most one ``R`` line of the right shape, and a forged one
can only carry answers, which the parent still compares with values the program never saw.

Value tokens (prefix notation, space-free): ``n`` None, ``t``/``f`` booleans, ``i<hex>`` int,
``d<float.hex()>`` float, ``c<re>,<im>`` complex, ``s<utf-8 hex>`` str, ``b<hex>`` bytes,
``a<hex>`` bytearray, ``q<num hex>/<den hex>`` Fraction, ``m<ascii hex>`` Decimal, and containers
``L<n>`` list, ``U<n>`` tuple, ``S<n>`` set, ``Z<n>`` frozenset, ``D<n>`` dict (``n`` key/value pairs
follow).
"""

from __future__ import annotations

TAG = "alignkit-sandbox"

#: the largest number of value tokens one result may have
MAX_TOKENS = 2_000_000


class UnsupportedResult(TypeError):
    """A result that is not plain data, so the parent cannot compare it."""


# ------------------------------------------------------------------------------------ result values


def encode_value(value, out: list, budget: int = MAX_TOKENS) -> None:
    """Append ``value`` as plain-data tokens to ``out`` (see the module docstring).

    Exact built-in types are encoded as they are, without running any code of the program's;
    subclasses of them become the base type (through the base type's own C methods), numpy scalars
    their ``.item()``. Anything else raises :class:`UnsupportedResult`; a structure of more than
    ``budget`` tokens (or a cyclic one) raises ``ValueError``.
    """
    import sys

    stack = [value]
    count = 0
    while stack:
        v = stack.pop()
        count += 1
        if count > budget:
            raise ValueError("the result is too large (or contains itself)")
        t = type(v)
        if v is None:
            out.append("n")
        elif t is bool:
            out.append("t" if v else "f")
        elif t is int:
            out.append("i" + format(v, "x"))
        elif t is float:
            out.append("d" + v.hex())
        elif t is str:
            out.append("s" + v.encode("utf-8", "surrogatepass").hex())
        elif t is list or t is tuple:
            out.append(("L" if t is list else "U") + str(len(v)))
            stack.extend(v[::-1])
        elif t is dict:
            out.append("D" + str(len(v)))
            for key, item in reversed(list(v.items())):
                stack.append(item)
                stack.append(key)
        elif t is set or t is frozenset:
            out.append(("S" if t is set else "Z") + str(len(v)))
            stack.extend(v)
        elif t is bytes:
            out.append("b" + v.hex())
        elif t is bytearray:
            out.append("a" + v.hex())
        elif t is complex:
            out.append("c" + v.real.hex() + "," + v.imag.hex())
        else:
            fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
            if fractions is not None and t is getattr(fractions, "Fraction", None):
                out.append("q" + format(v.numerator, "x") + "/" + format(v.denominator, "x"))
            elif decimal is not None and t is getattr(decimal, "Decimal", None):
                out.append("m" + str(v).encode("ascii").hex())
            else:
                stack.append(_plain(v, t))
                count -= 1


def _plain(v, t):
    """A subclass instance as its built-in base type, a numpy scalar as a Python one."""
    for base, convert in (
        (bool, bool),
        (int, int.__index__),
        (float, float.__float__),
        (str, str.__str__),
        (bytes, bytes),
        (bytearray, bytes),
        (list, list.copy),
        (tuple, lambda x: tuple.__getitem__(x, slice(None))),
        (dict, dict.copy),
        (set, set.copy),
        (frozenset, frozenset.copy),
        (complex, complex.__complex__),
    ):
        if issubclass(t, base):
            plain = convert(v)
            if type(plain) is t:  # a converter that gave the subclass back
                break
            return plain
    module = getattr(t, "__module__", "") or ""
    if module.partition(".")[0] == "numpy" and getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        item = v.item()
        if type(item) in (bool, int, float, complex, str, bytes):
            return item
    name = getattr(t, "__qualname__", "?")
    raise UnsupportedResult(
        f"the result is a {module + '.' if module and module != 'builtins' else ''}{name}: only plain data "
        "(None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, Fraction, Decimal) "
        "can be judged outside the program"
    )


class MalformedResult(ValueError):
    """Tokens that do not decode to one value."""


_CONTAINERS = {"L": list, "U": tuple, "S": set, "Z": frozenset}


def decode_values(tokens: list[str], start: int) -> tuple[object, int]:
    """Decode one value from ``tokens[start:]`` (iteratively: no recursion limit); ``(value, next)``.

    Raises :class:`MalformedResult` for anything that is not exactly the format above.
    """
    import decimal
    import fractions

    stack: list[list] = []  # [container tag, items still to come, items]
    i = start
    n_tokens = len(tokens)
    while True:
        if i >= n_tokens:
            raise MalformedResult("the result ends early")
        token = tokens[i]
        i += 1
        tag, body = token[:1], token[1:]
        try:
            if tag in "LUSZD" and tag:
                if not body.isdigit() or len(body) > 9:
                    raise MalformedResult(f"bad container size {body!r}")
                size = int(body) * (2 if tag == "D" else 1)
                if size > n_tokens - i:
                    raise MalformedResult("a container larger than the rest of the report")
                if size:
                    stack.append([tag, size, []])
                    continue
                value = {} if tag == "D" else _CONTAINERS[tag]()
            elif tag == "n" and not body:
                value = None
            elif tag == "t" and not body:
                value = True
            elif tag == "f" and not body:
                value = False
            elif tag == "i":
                value = _hex_int(body)
            elif tag == "d":
                value = float.fromhex(body)
            elif tag == "s":
                value = bytes.fromhex(body).decode("utf-8", "surrogatepass")
            elif tag == "b":
                value = bytes.fromhex(body)
            elif tag == "a":
                value = bytearray.fromhex(body)
            elif tag == "c":
                re_part, _, im_part = body.partition(",")
                value = complex(float.fromhex(re_part), float.fromhex(im_part))
            elif tag == "q":
                num, _, den = body.partition("/")
                value = fractions.Fraction(_hex_int(num), _hex_int(den))
            elif tag == "m":
                value = decimal.Decimal(bytes.fromhex(body).decode("ascii"))
            else:
                raise MalformedResult(f"unknown value token {token[:20]!r}")
        except MalformedResult:
            raise
        except (ValueError, ZeroDivisionError, OverflowError, decimal.InvalidOperation) as e:
            raise MalformedResult(f"bad value token {token[:20]!r}: {e}") from None
        while stack:  # attach the value to the containers it completes
            frame = stack[-1]
            frame[2].append(value)
            frame[1] -= 1
            if frame[1]:
                break
            stack.pop()
            tag, _, items = frame
            try:
                if tag == "D":
                    value = {items[k]: items[k + 1] for k in range(0, len(items), 2)}
                else:
                    value = _CONTAINERS[tag](items)
            except TypeError as e:  # an unhashable key or set element
                raise MalformedResult(str(e)) from None
        else:
            return value, i


def _hex_int(text: str) -> int:
    digits = text[1:] if text.startswith("-") else text
    if not digits or not all(c in "0123456789abcdef" for c in digits):
        raise MalformedResult(f"bad integer {text[:20]!r}")
    return int(text, 16)


def _hex(text) -> str:
    try:
        return str(text).encode("utf-8", "replace").hex()
    except BaseException:
        return ""


# ------------------------------------------------------------------------------------ the child


def main(job: dict) -> None:  # noqa: C901  (one straight sequence, kept in one place on purpose)
    """Run the job (see the module docstring); never returns."""
    import builtins
    import posix
    import sys

    import _imp  # noqa: F401  (imported before the hook refuses it)
    import _posixsubprocess
    import _signal
    import _sitebuiltins
    import resource

    _write, _exit = posix.write, posix._exit
    report_fd = job["report_fd"]
    root, cwd = job["root"], job["cwd"]

    def _emit(line: bytes) -> None:
        while line:
            try:
                line = line[_write(report_fd, line):]
            except InterruptedError:
                continue
            except OSError:
                return

    def _quit(status: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        _emit(b"X %d\n" % status)
        _exit(status)

    _emit(b"H\n")

    # ---- 1. resource limits
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
        _emit(("B " + kind + " " + _hex(what) + "\n").encode())

    if own_pid == 1:  # PID-namespace init: the kernel drops SIGXCPU's default action, so catch it
        def _on_xcpu(signum, frame, _x=_exit):
            try:
                _emit(b"L cpu_time\n")
            finally:
                _x(128 + signum)
        _signal.signal(_signal.SIGXCPU, _on_xcpu)

    # ---- 2. replace C functions that raise no audit event
    def _stub(kind, name):
        msg = TAG + ": blocked " + kind + ": " + name

        def blocked(*args, **kwargs):
            _report(kind, name)
            raise PermissionError(msg)

        blocked.__name__ = name.rpartition(".")[2]
        return blocked

    stubbed = (("pidfd_open", "signal"), ("mknod", "filesystem"), ("mkfifo", "filesystem"),
               ("setpriority", "processes"), ("sched_setscheduler", "processes"),
               ("sched_setparam", "processes"), ("sched_setaffinity", "processes"))
    os_module = sys.modules.get("os")
    for name, kind in stubbed:
        if hasattr(posix, name):
            setattr(posix, name, _stub(kind, "os." + name))
            if os_module is not None and hasattr(os_module, name):
                setattr(os_module, name, getattr(posix, name))
    if hasattr(_signal, "pidfd_send_signal"):
        _signal.pidfd_send_signal = _stub("signal", "signal.pidfd_send_signal")
    _posixsubprocess.fork_exec = _stub("processes", "_posixsubprocess.fork_exec")

    # ---- 3. the interpreter the program expects (-S skipped site), its files, the compiled code
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    for d in job["site"]:
        if d not in sys.path:
            sys.path.append(d)
    sys.argv = ["main.py"]
    sys.dont_write_bytecode = True
    for d in job["make_dirs"]:
        try:
            posix.mkdir(d, 0o700)
        except FileExistsError:
            pass
    source = job["program"]
    with open(cwd + "/main.py", "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)
    posix.chdir(cwd)

    main_name = job["main_name"]
    mod = type(sys)(main_name)
    g = mod.__dict__
    g["__builtins__"] = builtins
    g["__file__"] = cwd + "/main.py"
    sys.modules["__main__"] = mod
    sys.modules[main_name] = mod

    steps = job["steps"]
    compiled = []
    if steps is not None:
        for i, (kind, src) in enumerate(steps):
            try:
                compiled.append((kind, compile(src, "<test %d>" % (i + 1), "eval" if kind != "exec" else "exec",
                                               dont_inherit=True)))
            except BaseException as e:  # the parent parsed them already; a guard, not a path
                compiled.append((kind, (type(e).__name__, str(e))))
    try:
        code = compile(source, "main.py", "exec", dont_inherit=True)
    except BaseException as e:
        sys.__excepthook__(type(e), e.with_traceback(None), None)
        _quit(1)
    del source, f

    # ---- 4. the audit hook
    sys.addaudithook(_make_audit(
        report_fd=report_fd, root=root, write_roots=tuple(job["write_roots"]), own_pid=own_pid,
        proc_pid=proc_pid, controlled=controlled, deny_read=tuple(job["deny_read"]),
        deny_read_strict=tuple(job["deny_read_strict"]),
        allow_read=tuple(job["allow_read"]) + tuple(sys.path),
    ))
    job.clear()  # the bootstrap's frame still refers to it
    has_steps = steps is not None
    del steps, lim

    # ---- 5. the program, then the steps
    _exec, _eval, _type, _str, _BaseException, _SystemExit = exec, eval, type, str, BaseException, SystemExit
    try:
        _exec(code, g)
    except _SystemExit as e:
        status = _exit_status(e.code)
        if status != 0 or not has_steps:
            if status != 0 and not isinstance(e.code, int) and e.code is not None:
                try:
                    sys.stderr.write(_str(e.code) + "\n")
                except _BaseException:
                    pass
            _quit(status)
    except _BaseException as e:
        tb = e.__traceback__
        tb = tb.tb_next if tb is not None else None  # drop this frame: show the program's only
        try:
            e = e.with_traceback(tb)
        except _BaseException:
            pass
        try:
            sys.__excepthook__(_type(e), e, tb)
        except _BaseException:
            pass
        _quit(1)
    if not has_steps:
        _quit(0)

    threading = sys.modules.get("threading")
    if threading is not None:  # a program that runs its main() in a thread
        try:
            current = threading.current_thread()
            for t in threading.enumerate():
                if t is not current and not t.daemon:
                    t.join()
        except _BaseException:
            pass
    g["__name__"] = "__main__"  # the tests' own `if __name__ == "__main__":` blocks run
    out = ["R"]
    for kind, c in compiled:
        if _type(c) is tuple:
            out.append(("E" if kind != "exec" else "F") + _hex(c[0]) + "." + _hex(c[1]))
            continue
        if kind == "exec":
            try:
                _exec(c, g)
                out.append("P")
            except _SystemExit as e:
                if _exit_status(e.code) == 0:
                    out.append("P")
                else:
                    out.append("F" + _hex("SystemExit") + "." + _hex("exit status %r" % (e.code,)))
            except _BaseException as e:
                out.append("F" + _error_text(e))
            continue
        try:
            value = _eval(c, g)
            if kind == "truth":
                value = True if value else False
            tokens = []
            encode_value(value, tokens)
            out.append("V")
            out.extend(tokens)
        except _BaseException as e:
            out.append("E" + _error_text(e))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    _emit((" ".join(out) + "\n").encode())
    _quit(0)


def _exit_status(code) -> int:
    """The exit status ``SystemExit(code)`` gives (``None``/``False`` -> 0, text -> 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return int(code) & 0xFF
    return 1


def _error_text(e) -> str:
    try:
        name = type(e).__name__
    except BaseException:
        name = "Exception"
    try:
        msg = str(e)[:300]
    except BaseException:
        msg = ""
    return _hex(name) + "." + _hex(msg)


def _make_audit(
    *, report_fd, root, write_roots, own_pid, proc_pid, controlled, deny_read, deny_read_strict, allow_read,
):
    """The audit hook. It reads no global or builtin name at call time (everything it needs is a
    closure variable bound here to an immutable value or a C function) and calls no Python-level
    helper, so the program cannot patch what it relies on. Paths must be exact ``str``/``bytes``/
    ``int``; a path-like object (whose ``__fspath__`` could answer differently the second time) is
    refused for writing and only ``os.fspath``-ed for reading."""
    import posix
    import _stat

    return _build_hook(
        _type=type, _str=str, _bytes=bytes, _int=int, _list=list, _len=len,
        _reversed=reversed, _PermissionError=PermissionError, _ModuleNotFoundError=ModuleNotFoundError,
        _OSError=OSError, _Exception=Exception, _lstat=posix.lstat, _statf=posix.stat,
        _readlink=posix.readlink, _getcwd=posix.getcwd, _write=posix.write, _fspath=posix.fspath,
        _S_ISLNK=_stat.S_ISLNK, _S_ISDIR=_stat.S_ISDIR, report_fd=report_fd, tag=TAG,
        root=root, write_roots=write_roots, own_pid=own_pid, proc_pid=proc_pid, controlled=controlled,
        deny_read=deny_read, deny_read_strict=deny_read_strict, allow_read=allow_read,
        O_WRITE=posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND,
        O_DIR=getattr(posix, "O_DIRECTORY", 0) | getattr(posix, "O_PATH", 0),
    )


def _build_hook(
    _type, _str, _bytes, _int, _list, _len, _reversed, _PermissionError, _ModuleNotFoundError, _OSError,
    _Exception, _lstat, _statf, _readlink, _getcwd, _write, _fspath, _S_ISLNK, _S_ISDIR, report_fd, tag,
    root, write_roots, own_pid, proc_pid, controlled, deny_read, deny_read_strict, allow_read, O_WRITE, O_DIR,
):
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
                        "pathlib.Path.glob", "pathlib.Path.rglob", "os.listdir",
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
    # write-ish events besides "open"
    write_events = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                              "os.utime", "os.truncate", "os.rename", "shutil.rmtree",
                              "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
                              "os.lchmod", "os.symlink", "os.link"))
    root_slash = root + "/"
    write_slashes = _list(write_roots)
    for i in range(_len(write_slashes)):
        write_slashes[i] = write_slashes[i] + "/"
    write_slashes = tuple(write_slashes)

    def _audit(event, args):
        if event in ignore:
            return
        kind = None
        what = event
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
                        for w in write_slashes:
                            if resolved.startswith(w) or resolved + "/" == w:
                                inside = True
                                break
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
        line = ("B " + kind + " " + what.encode("utf-8", "replace").hex() + "\n").encode()
        try:
            _write(report_fd, line)
        except _OSError:
            pass
        raise _PermissionError(tag + ": blocked " + kind + ": " + what)

    return _audit
