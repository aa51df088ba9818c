"""The startd's launcher: one small long-lived process that starts every job of the startd.

Why: starting a job straight from the startd costs a fork of a large process (Twisted,
ClassAds, TLS: every page table copied) and, to account and contain the job, a fresh Python
interpreter per job. ``gwms.startd.process.Launcher`` starts this process once (lazily, and
again if it dies) as::

    python -I -S .../gwms/startd/launcher.py

It runs on the standard library only (``-I -S``: neither the job's nor the startd's PYTHON*
variables or site-packages change how it runs), so it must import nothing from ``gwms``.

Process tree::

    startd ==pipes== launcher (child subreaper)
                        |--> wrapper (session leader, child subreaper)
                        |       `--posix_spawn (or fork, identity switch, exec)--> job (own group)
                        |--> wrapper ...                                              `--> ...

A *wrapper* is a fork of the launcher (not a new interpreter) that runs one job at a time. It is
what makes a job's processes attributable: as a child subreaper, every orphan of the job (a
setsid + double fork daemon that also scrubbed its environment) is reparented to *it*, so "the
job has no processes left" is "the wrapper has no children left", known without a /proc scan.
It reaps with ``wait4``: exact rusage of the main process and of every orphan it reaps (each
including what that one reaped).

Wrappers are reused: a wrapper whose job is over (no children left) *and* which the startd has
released (it has finished with the job, so it will never again look for that job through the
wrapper's pid or session) takes the next job. While it has none its session is empty, so a
session id names exactly one job's processes at any time. Reuse matters: a fresh fork of a
Python process costs about a millisecond of CPU in copy-on-write faults alone, more than the
rest of a short job's start. With no identity to switch, the wrapper starts the job with
posix_spawn (vfork: nothing copied, no Python between fork and exec); with one, it forks a
child that switches uid/gid/groups before it opens the job's files and execs.

Wire protocol: one JSON object per line in both directions, every record tagged with the
job's ``id`` (a number the startd chooses).

startd -> launcher:

- ``{"op": "spawn", "id", "argv", "env", "cwd", "stdin", "stdout", "stderr", "uid", "gid",
  "groups"}``: start a job. ``stdin`` may be null (/dev/null); ``uid``/``gid``/``groups`` are
  null for "keep the launcher's" (what the identity switch's LaunchSpec said).
- ``{"op": "release", "id"}``: the startd is finished with the job; its wrapper may serve
  another once nothing of this one is left.
- ``{"op": "kill_wrapper", "id"}``: SIGKILL the job's wrapper (it stopped reporting). The
  launcher does it, not the startd, because only the launcher knows whether that pid is still
  the job's wrapper (not reaped, not serving another job).

launcher -> startd:

- ``start``: ``pid`` (the wrapper: session id of the job), ``job_pid`` (null if the job could not
  start), ``exec_error`` (null, or why; it then "exits" 127 if the command was not found, else
  126).
- ``exit``: the main process's wait ``status``, ``main`` and ``children`` rusage as
  ``[user s, sys s, maxrss KiB]`` (``children``: everything reaped for the job, main included);
  ``done`` true if nothing of the job is left (the usual case: the job is over), else
  ``leftovers`` true: the startd kills them (the wrapper keeps reaping).
- ``done``: after ``leftovers``, once the wrapper has no children left; final ``children``.
- ``lost``: the wrapper ended without ``done`` (killed): ``status`` is its own wait status.
- ``error``: the launcher could not start a wrapper (fork failed); ``error`` says why.

Records are small and each is written with one ``write``; wrappers report to the launcher over
one pipe, and the launcher forwards, so the startd reads one stream.

When the startd goes away (EOF on stdin) the launcher SIGKILLs the process group of every job
still running and exits (the startd's successor sweeps their sandboxes anyway); idle wrappers
see their request pipe close and exit.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import selectors
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36
MAX_RECORD = 3500        # below PIPE_BUF (4096): a write this size is atomic, records never interleave
MAX_REQUEST = 8 << 20    # a request line longer than this is not one of ours
MAX_IDLE = 32            # idle wrappers kept; more exit (a startd runs about one job per slot)

# Signals whose disposition must stay as it is in the launcher and wrappers: uncatchable,
# synchronous faults (ignoring them would turn a crash into a loop), and SIGCHLD (ignoring it
# makes the kernel reap children by itself, and wait4 would never see them).
_KEEP = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT, signal.SIGSEGV, signal.SIGBUS,
         signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP}

_prctl: object = None  # libc's prctl, looked up once in the launcher: the wrappers inherit it
_IGNORED: list[int] = []  # what the launcher set to SIG_IGN: what a job gets back as SIG_DFL


def _subreaper() -> bool:
    global _prctl
    try:
        if _prctl is None:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        # prctl is variadic and the kernel reads unsigned longs: pass them as such.
        return _prctl(ctypes.c_int(PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), ctypes.c_ulong(0),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _ignore_signals() -> None:
    """What the launcher does once, so that its forks (the wrappers) need not: ignore every
    signal but those in _KEEP. A job may signal its session or its wrapper, and the wrapper must
    live to report; Ctrl-C at the terminal of a foreground startd must not end the launcher
    before the startd does (it ends when the startd closes its pipe)."""
    for s in range(1, signal.NSIG):
        if s not in _KEEP:
            try:
                signal.signal(s, signal.SIG_IGN)
            except (OSError, ValueError):
                continue  # not a signal number on this system
            _IGNORED.append(s)


def _encode(record: dict) -> bytes:
    line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_RECORD:
        # Only a reason text can make a record long (a path in it): shorten that, keep the facts.
        for key in ("exec_error", "error"):
            if isinstance(record.get(key), str):
                record = {**record, key: record[key][:1000] + "..."}
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    return line


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------------------------------------
# Starting the job (in a wrapper)


class _SetupError(Exception):
    """A step before exec failed: the job cannot start."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(step, error)
        self.step = step
        self.error = error


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _exec_message(argv: list[str], e: BaseException) -> str:
    return f"cannot execute {argv[0]!r}: {_reason(e)}"


def _setup_message(step: str, argv: list[str], e: BaseException) -> str:
    return f"cannot {step} for {argv[0]!r}: {_reason(e)}"


def _exec_code(e: BaseException) -> int:
    # As the shells do: 127 not found, 126 found but not executable.
    return 127 if isinstance(e, FileNotFoundError) else 126


def _enter_sandbox(req: dict) -> tuple[int, int, int]:
    """chdir to the sandbox and open the job's stdin, stdout, stderr there, with the rights of
    whoever calls it (which is why, with an identity switch, only the job's child does). The
    caller owns the descriptors (close-on-exec: dup2 them into place)."""
    step = "enter the sandbox"
    opened: list[int] = []
    try:
        os.chdir(req["cwd"])
        step = "open stdin"
        opened.append(os.open(req.get("stdin") or os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        step = "open stdout"
        # O_NOFOLLOW: a symlink planted in the sandbox (by an input transfer) must not make us
        # truncate a file elsewhere.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        opened.append(os.open(req["stdout"], flags, 0o600))
        step = "open stderr"
        # One file for both: one descriptor, so that the two streams share the offset and
        # append to each other instead of overwriting.
        if os.path.abspath(req["stderr"]) == os.path.abspath(req["stdout"]):
            return opened[0], opened[1], opened[1]
        opened.append(os.open(req["stderr"], flags, 0o600))
        return opened[0], opened[1], opened[2]
    except (OSError, KeyError, TypeError, ValueError) as e:
        for fd in opened:
            os.close(fd)
        raise _SetupError(step, e) from None


def _spawn_direct(req: dict) -> tuple[int | None, str | None, int]:
    """No identity to switch: the wrapper (already the job's user) opens the files and
    posix_spawns the job (vfork: no copy of the page tables, no Python between fork and exec).
    Returns (pid, None, 0), or (None, why, exit code) if it could not start."""
    argv: list[str] = req["argv"]
    try:
        fd_in, fd_out, fd_err = _enter_sandbox(req)
    except _SetupError as e:
        return None, _setup_message(e.step, argv, e.error), 126
    try:
        env = req["env"]
        # posix_spawnp searches the *caller's* PATH: make it the job's, as execvpe would.
        if "PATH" in env:
            os.environ["PATH"] = env["PATH"]
        else:
            os.environ.pop("PATH", None)
        try:
            pid = os.posix_spawnp(argv[0], argv, env, setpgroup=0, setsigdef=_IGNORED, setsigmask=(),
                                  file_actions=[(os.POSIX_SPAWN_DUP2, fd_in, 0), (os.POSIX_SPAWN_DUP2, fd_out, 1),
                                                (os.POSIX_SPAWN_DUP2, fd_err, 2)])
        except (OSError, TypeError, ValueError) as e:
            message = _exec_message(argv, e)
            try:
                os.write(fd_err, ("gwms: " + message + "\n").encode("utf-8", "replace"))
            except OSError:
                pass
            return None, message, _exec_code(e)
        return pid, None, 0
    finally:
        for fd in {fd_in, fd_out, fd_err}:
            os.close(fd)


def _execvpe(argv: list[str], env: dict[str, str]) -> None:
    """``os.execvpe``, searching the job's PATH, without what that does on the side: it imports
    ``warnings``, and after the identity switch the job's user may not be able to read the
    interpreter's library (a Python installed under /root, say)."""
    file = argv[0]
    if "/" in file:
        os.execve(file, argv, env)
    error: OSError | None = None
    for directory in env.get("PATH", os.defpath).split(":"):
        try:
            os.execve(os.path.join(directory or ".", file), argv, env)
        except (FileNotFoundError, NotADirectoryError) as e:
            error = error or e
        except OSError as e:
            # As execvp(3): EACCES (or another real failure) on one entry is what is reported
            # if no later entry works, not the ENOENT of the last one.
            if error is None or isinstance(error, (FileNotFoundError, NotADirectoryError)):
                error = e
    raise error or FileNotFoundError(2, "No such file or directory")


def _job_child(req: dict, error_w: int) -> None:
    """In a fork of the wrapper: switch identity and become the job. Never returns: exec, or
    write why not to ``error_w`` and exit 127/126."""
    argv: list[str] = req["argv"]
    stdio_ready = False
    step = "create its process group"
    try:
        os.setpgid(0, 0)  # its own group: `kill 0` in a job script must not hit the wrapper
        # The identity switch first, so that the sandbox and the standard files are entered and
        # opened with the job's rights, never the launcher's.
        step = "switch identity"
        if req.get("groups") is not None:
            os.setgroups([int(g) for g in req["groups"]])
        if req.get("gid") is not None:
            os.setgid(int(req["gid"]))
        if req.get("uid") is not None:
            os.setuid(int(req["uid"]))
        try:
            fds = _enter_sandbox(req)
        except _SetupError as e:
            step = e.step
            raise e.error from None
        for fd, target in zip(fds, (0, 1, 2), strict=True):
            os.dup2(fd, target)  # the copies at 0, 1, 2 are inherited; the originals close at exec
        stdio_ready = True
        step = "reset signals"
        # Ignored signals stay ignored across exec (a job would see EPIPE instead of dying in
        # `producer | head`): back to the defaults. Handlers reset themselves at exec.
        for s in _IGNORED:
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        step = "execute"
        _execvpe(argv, req["env"])
    except BaseException as e:  # noqa: BLE001 - whatever it was, the job did not start
        if step == "execute":
            message, code = _exec_message(argv, e), _exec_code(e)
        else:
            message, code = _setup_message(step, argv, e), 126
        try:
            os.write(error_w, message.encode("utf-8", "replace")[:2000])
            if stdio_ready:
                os.write(2, ("gwms: " + message + "\n").encode("utf-8", "replace"))
        finally:
            os._exit(code)


def _spawn_switched(req: dict, report_w: int, request_r: int) -> tuple[int | None, str | None, int]:
    """With an identity switch: fork, and do it all in the child as the job's user. An exec
    failure comes back through a close-on-exec pipe (EOF alone means the exec happened)."""
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(error_r)
        os.close(report_w)
        os.close(request_r)
        _job_child(req, error_w)
    os.close(error_w)
    try:
        os.setpgid(pid, pid)  # also here, so that it holds before the startd can signal the group
    except OSError:
        pass
    error = b""
    while chunk := os.read(error_r, 4096):
        error += chunk
    os.close(error_r)
    return pid, error.decode("utf-8", "replace") or None, 0


# ---------------------------------------------------------------------------------------------
# A wrapper: a fork of the launcher, one job at a time


def _add(total: list, usage: os.struct_rusage | object) -> list:
    total[0] += usage.ru_utime
    total[1] += usage.ru_stime
    total[2] = max(total[2], usage.ru_maxrss)
    return total


def _run_job(req: dict, report_w: int, request_r: int) -> None:
    """Start one job and report on it to ``report_w`` until nothing of it is left."""
    job_id = req["id"]

    def send(**record: object) -> None:
        record["id"] = job_id
        try:
            os.write(report_w, _encode(record))
        except OSError:
            pass  # the launcher is gone: nobody left to tell, but the job is still to be reaped

    if req.get("uid") is None and req.get("gid") is None and req.get("groups") is None:
        pid, error, code = _spawn_direct(req)
    else:
        pid, error, code = _spawn_switched(req, report_w, request_r)
    send(event="start", pid=os.getpid(), job_pid=pid, exec_error=error)
    children = [0.0, 0.0, 0]  # what RUSAGE_CHILDREN would say, for this job only
    if pid is None:
        send(event="exit", status=code << 8, main=[0.0, 0.0, 0], children=children, done=True)
        return
    leftovers = False
    while True:
        try:
            done, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        _add(children, usage)
        if done != pid:
            continue
        main = _add([0.0, 0.0, 0], usage)
        # Dead orphans are not leftovers: reap those already gone, then see whether any
        # process of the job still lives (all of them are our descendants: we are their
        # subreaper, so "none left" is "no children left").
        while True:
            try:
                other, _, other_usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if other == 0:
                leftovers = True
                break
            _add(children, other_usage)
        if not leftovers:
            send(event="exit", status=status, main=main, children=children, done=True)
            return
        send(event="exit", status=status, main=main, children=children, leftovers=True)
    send(event="done", children=children)


def _wrapper_main(first: dict, request_r: int, report_w: int) -> None:
    """Run ``first``, then every job the launcher sends on ``request_r``, until it closes it.
    Never returns."""
    os.setsid()
    _subreaper()
    # Signals are ignored already (inherited from the launcher); SIGTERM too from now on, and
    # SIGCHLD back to the default, without which wait4 would not see the children.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    buffer = b""
    request: dict | None = first
    while request is not None:
        _run_job(request, report_w, request_r)
        os.chdir("/")  # not keep the job's sandbox busy while idle
        request = None
        while b"\n" not in buffer:
            chunk = os.read(request_r, 1 << 16)
            if not chunk:
                os._exit(0)  # the launcher is gone, or has enough idle wrappers
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        request = json.loads(line)
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# The launcher


class _Job:
    __slots__ = ("id", "wrapper", "job_pid", "exited", "done", "released")

    def __init__(self, job_id: int, wrapper: _Wrapper) -> None:
        self.id = job_id
        self.wrapper = wrapper
        self.job_pid: int | None = None
        self.exited = False
        self.done = False
        self.released = False


class _Wrapper:
    __slots__ = ("pid", "request_w", "job", "status")

    def __init__(self, pid: int, request_w: int) -> None:
        self.pid = pid
        self.request_w = request_w
        self.job: _Job | None = None
        self.status: int | None = None


class Launcher:
    def __init__(self, requests: int = 0, out: int = 1) -> None:
        self.requests = requests
        self.out = out
        self.jobs: dict[int, _Job] = {}             # by job id, until released (or lost)
        self.wrappers: dict[int, _Wrapper] = {}     # by pid, until reaped
        self.idle: list[_Wrapper] = []
        self.pending: list[bytes] = []              # records for the startd, written once per loop
        self.request_buffer = b""
        self.report_buffer = b""

    def emit(self, record: dict) -> None:
        self.pending.append(_encode(record))

    def flush(self) -> None:
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            _write_all(self.out, data)  # blocking: the startd reads as fast as it can

    # -- requests --

    def handle_request(self, request: dict) -> None:
        op = request.get("op")
        job_id = request.get("id")
        if not isinstance(job_id, int):
            print(f"gwms launcher: request without an id: {op!r}", file=sys.stderr)
            return
        job = self.jobs.get(job_id)
        if op == "spawn":
            self.spawn(request)
        elif op == "release":
            if job is not None:
                job.released = True
                self.recycle(job)
        elif op == "kill_wrapper":
            # Only while the wrapper is still this job's and not reaped (then the pid is it),
            # and not once it has said "done" (then it is fine, and soon another job's).
            if job is not None and not job.done and job.wrapper.job is job and job.wrapper.pid in self.wrappers:
                try:
                    os.kill(job.wrapper.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            print(f"gwms launcher: unknown request {op!r}", file=sys.stderr)

    def spawn(self, request: dict) -> None:
        job_id = request["id"]
        argv = request.get("argv")
        if job_id in self.jobs:
            self.emit({"id": job_id, "event": "error", "error": "duplicate job id"})
            return
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            self.emit({"id": job_id, "event": "error", "error": "argv must be a non-empty list of strings"})
            return
        line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        while self.idle:
            wrapper = self.idle.pop()  # the most recently used: its pages are the warmest
            try:
                _write_all(wrapper.request_w, line)
            except OSError:
                continue  # it died meanwhile; its end is reaped as any other
            self.assign(wrapper, job_id)
            return
        request_r, request_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(request_r)
            os.close(request_w)
            self.emit({"id": job_id, "event": "error", "error": f"cannot start the job: {e}"})
            return
        if pid == 0:
            try:
                self.become_wrapper(request_w)
                _wrapper_main(request, request_r, self.report_w)
            except BaseException:  # noqa: BLE001 - a bug here must not run a second launcher loop
                try:
                    import traceback  # only here: every import makes each fork dearer

                    os.write(self.report_w, _encode({"id": job_id, "event": "wrapper_error",
                                                     "error": traceback.format_exc()[-1500:]}))
                except OSError:
                    pass
            finally:
                os._exit(255)
        os.close(request_r)
        wrapper = _Wrapper(pid, request_w)
        self.wrappers[pid] = wrapper
        self.assign(wrapper, job_id)

    def assign(self, wrapper: _Wrapper, job_id: int) -> None:
        job = _Job(job_id, wrapper)
        wrapper.job = job
        self.jobs[job_id] = job

    def recycle(self, job: _Job) -> None:
        """A job the startd released and of which nothing is left: its wrapper is free."""
        if not (job.done and job.released):
            return
        del self.jobs[job.id]
        wrapper = job.wrapper
        if wrapper.job is not job or wrapper.pid not in self.wrappers:
            return
        wrapper.job = None
        if len(self.idle) < MAX_IDLE:
            self.idle.append(wrapper)
        else:
            os.close(wrapper.request_w)  # EOF: it exits
            wrapper.request_w = -1

    def become_wrapper(self, request_w: int) -> None:
        """In a fresh fork: drop everything that belongs to the launcher."""
        signal.set_wakeup_fd(-1)
        self.selector.close()
        # Other wrappers' request pipes too: holding them would keep those from seeing EOF.
        for fd in [self.report_r, self.wake_r, self.wake_w, request_w,
                   *(w.request_w for w in self.wrappers.values())]:
            if fd >= 0:
                os.close(fd)
        # The startd's pipes: a wrapper holding them would keep the startd from seeing the
        # launcher's end (EOF) if the launcher dies. Its stderr too: a wrapper reports through
        # report_w only.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    # -- reports --

    def read_reports(self) -> None:
        while True:
            try:
                chunk = os.read(self.report_r, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break  # cannot happen while we hold report_w
            self.report_buffer += chunk
        *lines, self.report_buffer = self.report_buffer.split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
                job = self.jobs.get(record["id"])
            except (ValueError, KeyError, TypeError):
                print("gwms launcher: malformed report from a wrapper", file=sys.stderr)
                continue
            if job is None:
                continue
            event = record.get("event")
            if event == "wrapper_error":
                print(f"gwms launcher: wrapper of job {job.id} failed:\n{record.get('error')}", file=sys.stderr)
                continue  # its end is reported as "lost" when it is reaped
            self.pending.append(line + b"\n")
            if event == "start":
                job.job_pid = record.get("job_pid")
            elif event == "exit":
                job.exited = True
                job.done = bool(record.get("done"))
            elif event == "done":
                job.done = True
            if job.done:
                self.recycle(job)

    def reap(self) -> list[_Wrapper]:
        """Reap every child that has ended; the wrappers among them are returned."""
        reaped = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            wrapper = self.wrappers.pop(pid, None)
            if wrapper is None:
                continue  # an orphan of a job whose wrapper died: we are its subreaper
            wrapper.status = status
            if wrapper.request_w >= 0:
                os.close(wrapper.request_w)
                wrapper.request_w = -1
            if wrapper in self.idle:
                self.idle.remove(wrapper)
            reaped.append(wrapper)

    def settle(self, reaped: list[_Wrapper]) -> None:
        # Called after the reports were read: a wrapper wrote everything it had to say before
        # it exited, so what it did not say by now, it never will.
        for wrapper in reaped:
            job = wrapper.job
            if job is not None and not job.done:
                self.jobs.pop(job.id, None)
                self.emit({"id": job.id, "event": "lost", "status": wrapper.status})

    # -- the loop --

    def read_requests(self) -> bool:
        """False on EOF: the startd is gone."""
        while True:
            try:
                chunk = os.read(self.requests, 1 << 16)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self.request_buffer += chunk
            *lines, self.request_buffer = self.request_buffer.split(b"\n")
            if len(self.request_buffer) > MAX_REQUEST:
                print("gwms launcher: request too long, dropped", file=sys.stderr)
                self.request_buffer = b""
            for line in lines:
                try:
                    request = json.loads(line)
                except ValueError:
                    print("gwms launcher: malformed request", file=sys.stderr)
                    continue
                if isinstance(request, dict):
                    self.handle_request(request)

    def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.job_pid is not None and not job.exited:
                try:
                    os.killpg(job.job_pid, signal.SIGKILL)
                except OSError:
                    pass

    def run(self) -> int:
        _subreaper()
        _ignore_signals()
        # SIGTERM is ignored: a stop of the startd's whole process group (systemd, a test,
        # a shell) must not take the jobs down before the startd's graceful shutdown does.
        # The launcher follows the startd's life through its stdin (EOF: jobs killed, exit).
        self.report_r, self.report_w = os.pipe()  # not inherited by exec'ed jobs (PEP 446)
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.requests, self.report_r, self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        os.set_blocking(self.out, True)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wakeup fd does the work
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.requests, selectors.EVENT_READ)
        self.selector.register(self.report_r, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        # Every object from now on stays out of the collector's way: a collection in a wrapper
        # would touch (and so copy) pages it otherwise shares with the launcher.
        gc.freeze()
        try:
            while True:
                events = self.selector.select()
                for key, _ in events:
                    if key.fd == self.wake_r:
                        try:
                            while os.read(self.wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                # Reap first, then read: what a reaped wrapper wrote before it exited is in the
                # pipe by now, and must be seen before a "lost" is decided for it.
                reaped = self.reap()
                self.read_reports()
                self.settle(reaped)
                if any(key.fd == self.requests for key, _ in events) and not self.read_requests():
                    self.flush()
                    self.shutdown()
                    return 0
                self.flush()
        except BrokenPipeError:
            self.shutdown()  # the startd is gone
            return 0


def main() -> int:
    return Launcher().run()


if __name__ == "__main__":
    sys.exit(main())
