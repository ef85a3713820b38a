"""The kernel boundary around a sandboxed program: bubblewrap, a throwaway uid, cgroups, seccomp.

:func:`get_boundary` probes once per interpreter what this machine allows and returns a
:class:`Boundary`; :meth:`Boundary.command` builds the command line of one run and
:meth:`Boundary.cgroup` its control group. What the program gets:

- **bubblewrap** (``bwrap``, the unprivileged sandbox Flatpak uses): new PID, network, IPC, UTS and
  cgroup namespaces, so no process outside is visible or signalable, there is no network (a
  loopback of its own, so nothing on the host's ``127.0.0.1``) and no abstract unix socket of the
  host; a mount view that holds only ``/usr`` (and its ``/bin``, ``/lib*`` links) and the
  interpreter's own directories read-only, a fresh ``/proc`` and minimal ``/dev``, and private
  size-limited tmpfs at ``/sandbox`` (the working directory), ``/tmp`` and ``/dev/shm``: no host
  file system, no project files, no ``/etc``, no home directory, no host unix socket;
  ``--new-session`` (no terminal injection) and ``--die-with-parent`` (nothing outlives the
  verifier); when the namespace's first process exits the kernel kills every other one.
- **a throwaway uid**: when the verifier runs as root, bwrap runs without a user namespace and the
  program is started through ``setpriv`` as a random uid/gid in ``[2_000_000_000, 2_016_777_216)``
  with no capabilities, an empty bounding set, no supplementary groups and ``no_new_privs``. Such a
  uid owns nothing on the host, shares no keyring or process count with another run, and makes
  ``RLIMIT_NPROC`` an exact per-run task limit. As an ordinary user, bwrap makes an unprivileged user
  namespace and the program runs as that user's uid, with no capabilities (there is no other uid to
  switch to without privileges); the mount view is what keeps it from the user's files then.
- **a cgroup per run** (v1 or v2, where this process may create one): ``pids.max`` (processes and
  threads) and a memory limit, tmpfs pages included; whatever is left in it is killed afterwards.
- **seccomp** (through libseccomp, where it is installed): refuses the system calls a Python
  program has no use for and that widen the kernel's attack surface (``ptrace``, ``bpf``,
  ``keyctl``, ``userfaultfd``, ``io_uring``, ``perf_event_open``, module and mount calls, new
  namespaces, ``TIOCSTI``...).

bubblewrap was chosen over a hand-written ``unshare`` + ``pivot_root`` because it is a small,
audited, widely packaged tool that does exactly this job (namespaces, mount view from binds and
tmpfs, ``no_new_privs``, seccomp loading, parent-death signal) in one exec, at a cost of a few
milliseconds; setpriv (util-linux) changes the uid; cgroups are plain file writes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Boundary", "RunCgroup", "SANDBOX_ROOT", "UID_BASE", "UID_RANGE", "data_fd", "get_boundary"]

logger = logging.getLogger(__name__)

#: where the sandbox's own writable directory is mounted inside the boundary
SANDBOX_ROOT = "/sandbox"
#: the per-run uids (and gids) when the verifier runs as root
UID_BASE = 2_000_000_000
UID_RANGE = 1 << 24
#: tasks the boundary itself adds to a run's cgroup (bwrap's monitor and its PID-namespace init)
BOUNDARY_TASKS = 2
#: memory a run's cgroup gets on top of ``memory_mb`` (bwrap, the interpreter's shared pages, tmpfs)
CGROUP_MEMORY_SLACK_MB = 64

_ENV_BWRAP = "ALIGNKIT_BWRAP"


# ------------------------------------------------------------------------------------ seccomp

#: system calls refused with EPERM inside the boundary
SECCOMP_DENY = (
    "_sysctl", "acct", "add_key", "adjtimex", "bpf", "chroot", "clock_adjtime", "clock_settime",
    "create_module", "delete_module", "fanotify_init", "finit_module", "fsconfig", "fsmount", "fsopen",
    "fspick", "get_kernel_syms", "init_module", "io_uring_enter", "io_uring_register", "io_uring_setup",
    "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mount",
    "mount_setattr", "move_mount", "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree",
    "perf_event_open", "personality", "pidfd_getfd", "pivot_root", "process_madvise", "process_vm_readv",
    "process_vm_writev", "ptrace", "query_module", "quotactl", "quotactl_fd", "reboot", "request_key",
    "setdomainname", "sethostname", "setns", "settimeofday", "swapoff", "swapon", "syslog", "umount",
    "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vhangup", "vm86", "vm86old",
)
#: clone() flags that make new namespaces: refused (clone3 is refused with ENOSYS, so libc falls back)
_CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7


def _scmp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def build_seccomp_filter() -> tuple[bytes | None, str]:
    """The BPF program for :data:`SECCOMP_DENY` (and namespace flags, ``clone3``, ``TIOCSTI``),
    built with libseccomp through ctypes in this (trusted) process; ``(None, why)`` without it."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        return None, f"libseccomp not found ({e})"
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ScmpArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return None, "seccomp_init failed"
    try:
        rules = 0

        def add(syscall: str, action: int, *cmps: tuple[int, int, int]) -> None:
            nonlocal rules
            nr = lib.seccomp_syscall_resolve_name(syscall.encode())
            if nr < 0:  # not on this architecture
                return
            arr = (_ScmpArgCmp * max(1, len(cmps)))(*[_ScmpArgCmp(a, _SCMP_CMP_MASKED_EQ, m, v) for a, m, v in cmps])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr if cmps else None)
            if rc != 0:
                raise OSError(-rc, f"seccomp_rule_add({syscall}) failed: {os.strerror(-rc)}")
            rules += 1

        for syscall in SECCOMP_DENY:
            add(syscall, _scmp_errno(errno.EPERM))
        for flag in _CLONE_NS_FLAGS:
            add("clone", _scmp_errno(errno.EPERM), (0, flag, flag))
        add("clone3", _scmp_errno(errno.ENOSYS))
        for request in (_TIOCSTI, _TIOCLINUX):
            add("ioctl", _scmp_errno(errno.EPERM), (1, 0xFFFFFFFF, request))
        r, w = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctx, w)
            os.close(w)
            w = -1
            if rc != 0:
                return None, f"seccomp_export_bpf failed: {os.strerror(-rc)}"
            chunks = []
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            if w >= 0:
                os.close(w)
            os.close(r)
        return b"".join(chunks), f"seccomp ({rules} rules)"
    except OSError as e:
        return None, f"seccomp filter not built ({e})"
    finally:
        lib.seccomp_release(ctx)


# ------------------------------------------------------------------------------------ cgroups


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fs type, super options) of every mount of this process."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) >= 5 and len(rfields) >= 3:
                    out.append((fields[3], fields[4].replace("\\040", " "), rfields[0], rfields[2]))
    except OSError:
        pass
    return out


@dataclass(frozen=True)
class CgroupSetup:
    """Where this process may create per-run cgroups: ``{controller: parent directory}``."""

    version: int
    parents: tuple[tuple[str, str], ...]  # (controller, directory); one directory for both in v2

    def describe(self) -> str:
        return f"cgroup v{self.version} ({', '.join(c for c, _ in self.parents)})"


def _find_cgroup_parents() -> tuple[CgroupSetup | None, str]:
    """The cgroup directories (this process's own, so its limits still apply) under which per-run
    cgroups with the ``pids`` and ``memory`` controllers can be made; ``(None, why)`` otherwise."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f if line.strip()]
    except OSError as e:
        return None, f"no /proc/self/cgroup ({e})"
    mounts = _mountinfo()
    v1: dict[str, str] = {}
    v2_path = None
    for hier, controllers, path in lines:
        if hier == "0" and controllers == "":
            v2_path = path
            continue
        for c in controllers.split(","):
            if c in ("pids", "memory", "cpuacct"):
                for mroot, mpoint, fstype, opts in mounts:
                    if fstype == "cgroup" and c in opts.split(","):
                        rel = path[len(mroot):] if mroot != "/" and path.startswith(mroot) else path
                        v1[c] = os.path.join(mpoint, rel.lstrip("/"))
                        break
    if "pids" in v1 and "memory" in v1:
        parents = [("pids", v1["pids"]), ("memory", v1["memory"])]
        if "cpuacct" in v1:  # optional: the run's CPU time, its children's included
            parents.append(("cpuacct", v1["cpuacct"]))
        return CgroupSetup(1, tuple(parents)), ""
    if v2_path is not None:
        for mroot, mpoint, fstype, _ in mounts:
            if fstype != "cgroup2":
                continue
            rel = v2_path[len(mroot):] if mroot != "/" and v2_path.startswith(mroot) else v2_path
            directory = os.path.join(mpoint, rel.lstrip("/"))
            try:
                with open(os.path.join(directory, "cgroup.controllers")) as f:
                    available = f.read().split()
            except OSError:
                continue
            if not {"pids", "memory"} <= set(available):
                continue
            try:
                with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                    enabled = f.read().split()
                if not {"pids", "memory"} <= set(enabled):
                    with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
                        f.write("+pids +memory")
            except OSError as e:
                return None, f"cgroup v2 controllers cannot be enabled under {directory} ({e.strerror})"
            return CgroupSetup(2, (("pids", directory), ("memory", directory))), ""
    return None, "no pids and memory cgroup controllers this process may use"


_cgroup_counter = [0]
_cgroup_lock = threading.Lock()
_pending_removal: list[str] = []


def _retry_pending_removals() -> None:
    with _cgroup_lock:
        pending = list(_pending_removal)
        _pending_removal.clear()
    for d in pending:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:
            with _cgroup_lock:
                _pending_removal.append(d)


class RunCgroup:
    """The cgroup(s) of one run: created with limits, joined by the sandbox's first process (see
    :meth:`Boundary.command`), emptied and removed by :meth:`close`."""

    def __init__(self, setup: CgroupSetup, pids_max: int, memory_bytes: int):
        if _pending_removal:
            _retry_pending_removals()
        with _cgroup_lock:
            _cgroup_counter[0] += 1
            name = f"alignkit-sandbox-{os.getpid()}-{_cgroup_counter[0]}"
        self.version = setup.version
        self.dirs: list[str] = []
        try:
            for controller, parent in setup.parents:
                d = os.path.join(parent, name)
                if d in self.dirs:
                    continue
                os.mkdir(d)
                self.dirs.append(d)
            self._set_limits(setup, pids_max, memory_bytes)
        except OSError:
            self.close()
            raise
        self._events_before = self._counters()

    def _set_limits(self, setup: CgroupSetup, pids_max: int, memory_bytes: int) -> None:
        by_controller = {c: os.path.join(p, os.path.basename(self.dirs[0])) for c, p in setup.parents}
        _write(os.path.join(by_controller["pids"], "pids.max"), str(pids_max))
        mem = by_controller["memory"]
        if self.version == 1:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
            try:  # no swap either, where swap accounting is on
                _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_bytes))
            except OSError:
                pass
        else:
            _write(os.path.join(mem, "memory.max"), str(memory_bytes))
            try:
                _write(os.path.join(mem, "memory.swap.max"), "0")
            except OSError:
                pass
        self._pids_dir, self._memory_dir = by_controller["pids"], mem
        self._cpu_dir = by_controller.get("cpuacct", mem if self.version == 2 else None)

    def cpu_seconds(self) -> float | None:
        """CPU time used by every task of the run (``None`` where the cgroup does not count it)."""
        if self._cpu_dir is None:
            return None
        if self.version == 1:
            text = _read(os.path.join(self._cpu_dir, "cpuacct.usage")).strip()
            return int(text) / 1e9 if text.isdigit() else None
        for line in _read(os.path.join(self._cpu_dir, "cpu.stat")).splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                return int(value) / 1e6
        return None

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def _counters(self) -> tuple[int, int]:
        """(OOM kills, refused forks) so far."""
        oom = 0
        if self.version == 1:
            text = _read(os.path.join(self._memory_dir, "memory.oom_control"))
        else:
            text = _read(os.path.join(self._memory_dir, "memory.events"))
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                oom = int(value)
        pids = 0
        for line in _read(os.path.join(self._pids_dir, "pids.events")).splitlines():
            key, _, value = line.partition(" ")
            if key == "max" and value.strip().isdigit():
                pids = int(value)
        return oom, pids

    def limits_hit(self) -> tuple[bool, bool]:
        """(the memory limit killed a process, the task limit refused a fork/thread)."""
        oom, pids = self._counters()
        return oom > self._events_before[0], pids > self._events_before[1]

    def pids(self) -> list[int]:
        """The processes in the run's cgroup now."""
        if not self.dirs:
            return []
        return [int(p) for p in _read(os.path.join(self.dirs[0], "cgroup.procs")).split() if p.isdigit()]

    def kill_all(self) -> None:
        for d in self.dirs:
            kill_file = os.path.join(d, "cgroup.kill")
            if self.version == 2 and os.path.exists(kill_file):
                try:
                    _write(kill_file, "1")
                    continue
                except OSError:
                    pass
            for _ in range(100):  # forks may race the kill; pids.max bounds them
                pids = [int(p) for p in _read(os.path.join(d, "cgroup.procs")).split() if p.isdigit()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass

    def close(self) -> None:
        """Kill what is left and remove the directories (waiting briefly for the dying tasks)."""
        if not self.dirs:
            return
        self.kill_all()
        deadline = time.monotonic() + 2.0
        for d in self.dirs:
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        # dead tasks not reaped yet (by whoever inherited them): try again later
                        logger.warning("the sandbox cgroup %s is not empty yet; removing it later", d)
                        with _cgroup_lock:
                            _pending_removal.append(d)
                        break
                    self.kill_all()
                    time.sleep(0.005)
        self.dirs = []


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _remove_stale_cgroups(setup: CgroupSetup) -> None:
    """Remove empty per-run cgroups left by verifier processes that no longer exist."""
    for _, parent in setup.parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if not name.startswith("alignkit-sandbox-"):
                continue
            pid = name.split("-")[2] if name.count("-") >= 3 else ""
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass


# ------------------------------------------------------------------------------------ the boundary


@dataclass(frozen=True)
class Boundary:
    """What :func:`get_boundary` found. ``available`` is False with the reason in ``reason``."""

    available: bool
    reason: str
    bwrap: str = ""
    setpriv: str = ""
    as_root: bool = False
    binds: tuple[tuple[str, str], ...] = ()  # (kind, path): ("ro", dir) or ("symlink", "target:link")
    seccomp: bytes | None = None
    seccomp_note: str = ""
    cgroups: CgroupSetup | None = None
    cgroup_note: str = ""
    version: str = ""
    #: the bwrap options this version has, of those that differ between versions
    options: frozenset[str] = frozenset({"--disable-userns", "--size", "--perms"})
    parts: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line: what holds in a run (recorded in every result)."""
        return ", ".join(self.parts)

    def new_uid(self) -> int | None:
        """A fresh uid (and gid) for one run when running as root; ``None`` otherwise."""
        return UID_BASE + secrets.randbelow(UID_RANGE) if self.as_root else None

    def cgroup(self, max_tasks: int, memory_mb: int) -> RunCgroup | None:
        """A cgroup for one run (``max_tasks`` of the program's own, plus the boundary's), or ``None``
        where cgroups are not available (or creating one failed: logged, the run goes on without)."""
        if self.cgroups is None:
            return None
        try:
            return RunCgroup(self.cgroups, max_tasks + BOUNDARY_TASKS,
                             (int(memory_mb) + CGROUP_MEMORY_SLACK_MB) * 1024 * 1024)
        except OSError as e:
            logger.warning("a sandbox cgroup could not be created (%s); this run has rlimits only", e)
            return None

    def command(
        self, argv: list[str], *, uid: int | None, seccomp_fd: int | None, cgroup: RunCgroup | None,
        tmpfs_mb: int,
    ) -> list[str]:
        """The full command line that runs ``argv`` (an interpreter and its arguments) inside."""
        cmd: list[str] = []
        if cgroup is not None:  # the first process joins the cgroup(s), then becomes bwrap
            cmd += ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"',
                    "alignkit-sandbox", *cgroup.procs_files, "--"]
        cmd += [self.bwrap]
        if self.as_root:
            cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        else:
            cmd += ["--unshare-all", "--unshare-user"]
            if "--disable-userns" in self.options:  # bwrap >= 0.8; seccomp refuses new namespaces too
                cmd += ["--disable-userns"]
        cmd += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--cap-drop", "ALL"]
        if self.as_root:
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        size = str(max(1, int(tmpfs_mb)) * 1024 * 1024)
        # the private tmpfs first, so that an interpreter kept under /tmp is bound on top of it
        cmd += [*self._perms("01777"), *self._size(4 * int(size)), "--tmpfs", SANDBOX_ROOT,
                *self._perms("01777"), *self._size(int(size)), "--tmpfs", "/tmp"]
        made: set[str] = {"/", "/tmp", SANDBOX_ROOT}
        for kind, spec in self.binds:
            if kind == "symlink":
                target, _, link = spec.partition(":")
                cmd += ["--symlink", target, link]
                made.add(link)
                continue
            for parent in _ancestors(spec):
                if parent not in made:
                    cmd += [*self._perms("0755"), "--dir", parent]
                    made.add(parent)
            cmd += ["--ro-bind", spec, spec]
            made.add(spec)
        cmd += ["--proc", "/proc", "--dev", "/dev",
                *self._perms("01777"), *self._size(int(size)), "--tmpfs", "/dev/shm",
                "--chdir", "/"]
        if seccomp_fd is not None:
            cmd += ["--seccomp", str(seccomp_fd)]
        cmd += ["--"]
        if self.as_root:
            if uid is None:
                raise ValueError("a run as root needs a uid")
            cmd += [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]
        return cmd + list(argv)


    def _perms(self, mode: str) -> list[str]:
        return ["--perms", mode] if "--perms" in self.options else []

    def _size(self, size: int) -> list[str]:
        return ["--size", str(size)] if "--size" in self.options else []


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _interpreter_dirs(python: str) -> tuple[list[str], str]:
    """The directories ``python`` needs (prefixes, the executable's own, site-packages), real paths."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # not realpath: venvs share the binary
        import site

        values = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()]
    else:
        code = ("import sys, site; print('\\n'.join([sys.prefix, sys.base_prefix, sys.exec_prefix, "
                "sys.base_exec_prefix, *site.getsitepackages()]))")
        try:
            out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            return [], f"cannot run {python} ({e})"
        values = out.stdout.split("\n")
    dirs = {os.path.realpath(v) for v in values if v.strip()}
    exe_dir = os.path.dirname(os.path.abspath(python))
    dirs.add(os.path.realpath(exe_dir))
    dirs.add(os.path.realpath(os.path.dirname(os.path.realpath(python))))
    # a venv: its directory holds pyvenv.cfg next to bin/
    for d in list(dirs) + [os.path.dirname(exe_dir)]:
        if os.path.isfile(os.path.join(d, "pyvenv.cfg")):
            dirs.add(os.path.realpath(d))
    kept = sorted(d for d in dirs if os.path.isdir(d) and d != "/" and not (d == "/usr" or d.startswith("/usr/")))
    # keep the outermost of nested directories
    out: list[str] = []
    for d in kept:
        if not any(d.startswith(o + "/") for o in out):
            out.append(d)
    return out, ""


def _system_binds() -> list[tuple[str, str]]:
    binds: list[tuple[str, str]] = [("ro", "/usr")]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            binds.append(("symlink", os.readlink(path) + ":" + path))
        elif os.path.isdir(path):
            binds.append(("ro", path))
    if os.path.isfile("/etc/ld.so.cache"):  # faster library lookups; holds only library paths
        binds.append(("ro", "/etc/ld.so.cache"))
    return binds


_boundary_cache: dict[str, Boundary] = {}
_boundary_lock = threading.Lock()


def get_boundary(python: str = sys.executable) -> Boundary:
    """Probe (once per interpreter and ``$ALIGNKIT_BWRAP`` value) whether the boundary works here.

    ``$ALIGNKIT_BWRAP`` names the bwrap binary (default: ``bwrap`` on ``PATH``); an empty value
    makes the boundary unavailable (for tests of the fallback).
    """
    bwrap_setting = os.environ.get(_ENV_BWRAP)
    key = f"{python}\0{bwrap_setting}"
    with _boundary_lock:
        if key not in _boundary_cache:
            _boundary_cache[key] = _probe(python, bwrap_setting)
        return _boundary_cache[key]


def _probe(python: str, bwrap_setting: str | None) -> Boundary:
    if sys.platform != "linux":
        return Boundary(False, f"the kernel boundary needs Linux (this is {sys.platform})")
    if bwrap_setting is not None:
        bwrap = shutil.which(bwrap_setting) if bwrap_setting else None
        if not bwrap:
            return Boundary(False, f"${_ENV_BWRAP}={bwrap_setting!r} names no bwrap binary")
    else:
        bwrap = shutil.which("bwrap")
        if not bwrap:
            return Boundary(False, "bubblewrap is not installed (`apt-get install bubblewrap`)")
    as_root = os.geteuid() == 0
    setpriv = ""
    if as_root:
        setpriv = shutil.which("setpriv") or ""
        if not setpriv:
            return Boundary(False, "running as root, and setpriv (util-linux) is missing to drop to a throwaway uid")
        setpriv = os.path.realpath(setpriv)
        if not setpriv.startswith("/usr/"):
            return Boundary(False, f"setpriv at {setpriv} is outside /usr, so not visible inside the sandbox")
    interp_dirs, why = _interpreter_dirs(python)
    if why:
        return Boundary(False, why)
    binds = tuple(_system_binds() + [("ro", d) for d in interp_dirs])
    seccomp, seccomp_note = build_seccomp_filter()
    cgroups, cgroup_note = (None, "not root") if not as_root else _find_cgroup_parents()
    if cgroups is not None:
        _remove_stale_cgroups(cgroups)
        try:
            RunCgroup(cgroups, 8, 64 * 1024 * 1024).close()
        except OSError as e:
            cgroups, cgroup_note = None, f"cgroups not writable ({e.strerror or e})"
    try:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return Boundary(False, f"{bwrap} does not run ({e})")
    options = frozenset(o for o in ("--disable-userns", "--size", "--perms") if o in usage.split())
    if as_root and "--perms" not in options:
        return Boundary(False, f"{version or bwrap} is too old (no --perms, bubblewrap >= 0.5 is needed as root)")
    candidate = Boundary(True, "", bwrap=bwrap, setpriv=setpriv, as_root=as_root, binds=binds, seccomp=seccomp,
                         seccomp_note=seccomp_note, cgroups=cgroups, cgroup_note=cgroup_note, version=version,
                         options=options)
    problem = _probe_run(candidate, python)
    if problem:
        return Boundary(False, problem)
    parts = [version or "bubblewrap",
             "throwaway uid" if as_root else f"user namespace as uid {os.getuid()}",
             cgroups.describe() if cgroups is not None else f"no cgroup ({cgroup_note})",
             seccomp_note if seccomp is not None else f"no seccomp ({seccomp_note})"]
    if "--size" not in options:
        parts.append("tmpfs without size limits (bubblewrap < 0.7)")
    return Boundary(True, "", bwrap=bwrap, setpriv=setpriv, as_root=as_root, binds=binds, seccomp=seccomp,
                    seccomp_note=seccomp_note, cgroups=cgroups, cgroup_note=cgroup_note, version=version,
                    options=options, parts=tuple(parts))


_PROBE_CODE = (
    "import os,sys\n"
    "print(os.getuid(), os.getpid(), int(os.path.exists('/etc/passwd')), int(os.access('/usr', os.W_OK)))\n"
)


def _probe_run(boundary: Boundary, python: str) -> str:
    """Run a tiny program inside; the reason it failed, or ``""``."""
    uid = boundary.new_uid()
    cgroup = boundary.cgroup(8, 64)
    seccomp_r = None
    try:
        if boundary.seccomp is not None:
            seccomp_r = data_fd(boundary.seccomp)
        cmd = boundary.command([python, "-I", "-S", "-B", "-c", _PROBE_CODE], uid=uid, seccomp_fd=seccomp_r,
                               cgroup=cgroup, tmpfs_mb=4)
        try:
            out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                                 env={"PATH": "/usr/bin:/bin"}, pass_fds=(seccomp_r,) if seccomp_r is not None else (),
                                 start_new_session=True)
        except (OSError, subprocess.SubprocessError) as e:
            return f"bwrap could not start ({e})"
    finally:
        if seccomp_r is not None:
            os.close(seccomp_r)
        if cgroup is not None:
            cgroup.close()
    if out.returncode != 0:
        err = " ".join(out.stderr.split())[-300:]
        return f"bwrap failed (exit status {out.returncode}): {err}"
    fields = out.stdout.split()
    if len(fields) != 4:
        return f"the probe printed {out.stdout!r}"
    got_uid, pid, sees_etc, usr_writable = (int(x) for x in fields)
    if boundary.as_root and got_uid != uid:
        return f"the program ran as uid {got_uid}, not the throwaway uid {uid}"
    if not boundary.as_root and os.getuid() == 0:
        return "the program would run as root"
    if pid > 2:
        return f"no PID namespace (pid {pid})"
    if sees_etc or usr_writable:
        return "the mount view is not the minimal read-only one"
    return ""


def data_fd(data: bytes) -> int:
    """A readable descriptor holding ``data``, at offset 0 (a memfd, else an unlinked temporary file)."""
    try:
        fd = os.memfd_create("alignkit-sandbox", 0)
    except (AttributeError, OSError):
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
