"""The startd's launcher: one small long-lived process that starts every job of the startd.

Why: starting a job straight from the startd costs a fork of a large process (Twisted,
ClassAds, TLS: every page table copied) and, to account and contain the job, a fresh Python
interpreter per job. This process is small, so its forks are cheap, and it stays up for the
startd's lifetime. ``gwms.startd.process.Launcher`` starts it (lazily, and again if it dies) as::

    python -I -S .../gwms/startd/launcher.py

It runs on the standard library only (``-I -S``: neither the job's nor the startd's PYTHON*
variables or site-packages change how it runs), so it must import nothing from ``gwms``.

Process tree per job::

    startd --pipe--> launcher (child subreaper) --fork--> wrapper (session leader, child subreaper)
                                                             `--fork--> job (own process group,
                                                                        identity switched, exec)

The per-job *wrapper* is a fork of the launcher, not a new interpreter. It is what makes a job's
processes attributable: as a child subreaper, every orphan of the job (a setsid + double fork
daemon that also scrubbed its environment) is reparented to *it*, so "the job has no processes
left" is simply "the wrapper has no children left", with no /proc scan. It reaps with
``wait4``: exact rusage of the main process, and ``RUSAGE_CHILDREN`` for everything it reaped.

Wire protocol: one JSON object per line in both directions, every record tagged with the
job's ``id`` (a number the startd chooses).

startd -> launcher:

- ``{"op": "spawn", "id", "argv", "env", "cwd", "stdin", "stdout", "stderr", "uid", "gid",
  "groups"}``: start a job. ``stdin`` may be null (/dev/null); ``uid``/``gid``/``groups`` are
  null for "keep the launcher's" (what the identity switch's LaunchSpec said).
- ``{"op": "kill_wrapper", "id"}``: SIGKILL the job's wrapper (it stopped reporting). The
  launcher does it, not the startd, because only the launcher knows whether that pid has been
  reaped already and so might belong to somebody else now.

launcher -> startd:

- ``start``: ``pid`` (the wrapper: session id of the job), ``job_pid``, ``exec_error`` (null, or
  why the job could not be started; it then exits 127 if the command was not found, else 126).
- ``exit``: the main process's wait ``status``, ``main`` and ``children`` rusage as
  ``[user s, sys s, maxrss KiB]``; ``done`` true if nothing of the job is left (the usual case:
  the job is over), else ``leftovers`` true: the startd kills them (the wrapper keeps reaping).
- ``done``: after ``leftovers``, once the wrapper has no children left; final ``children``.
- ``lost``: the wrapper ended without ``done`` (killed): ``status`` is its own wait status.
- ``error``: the job could not even be forked; ``error`` says why.

Records are small and each is written with one ``write``; wrappers report to the launcher over
a pipe of its own, and the launcher forwards, so the startd reads one stream.

When the startd goes away (EOF on stdin) the launcher SIGKILLs the process group of every job
still running and exits: the startd's successor will sweep their sandboxes anyway.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import selectors
import signal
import sys
import traceback

PR_SET_CHILD_SUBREAPER = 36
MAX_RECORD = 3500        # below PIPE_BUF (4096): a write this size is atomic, records never interleave
MAX_REQUEST = 8 << 20    # a request line longer than this is not one of ours

# Signals whose disposition must stay as it is in the launcher and wrappers: uncatchable,
# synchronous faults (ignoring them would turn a crash into a loop), and SIGCHLD (ignoring it
# makes the kernel reap children by itself, and wait4 would never see them).
_KEEP = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT, signal.SIGSEGV, signal.SIGBUS,
         signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP}


_prctl: object = None  # libc's prctl, looked up once in the launcher: the wrappers inherit it
_IGNORED: list[int] = []  # what the launcher set to SIG_IGN: what a job's child sets back


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
    before the startd (it ends when the startd closes its pipe)."""
    for s in range(1, signal.NSIG):
        if s not in _KEEP:
            try:
                signal.signal(s, signal.SIG_IGN)
            except (OSError, ValueError):
                continue  # not a signal number on this system
            _IGNORED.append(s)


def _ru(r: resource.struct_rusage) -> list[float]:
    return [r.ru_utime, r.ru_stime, r.ru_maxrss]


def _encode(record: dict) -> bytes:
    line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_RECORD and isinstance(record.get("exec_error"), str):
        # Only a reason text can make a record long (a path in it): shorten that, keep the facts.
        record = {**record, "exec_error": record["exec_error"][:1000] + "..."}
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    return line


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------------------------------------
# In the job's process, between fork and exec


def _job_child(req: dict, error_w: int) -> None:
    """Become the job. Never returns: exec, or write why not to ``error_w`` and exit 127/126."""
    step = "start"
    argv: list[str] = req["argv"]
    stdio_ready = False
    try:
        step = "create its process group"
        os.setpgid(0, 0)  # its own group: `kill 0` in a job script must not hit the wrapper
        # The identity switch first, so that the sandbox and the standard files are entered and
        # opened with the job's rights, never the launcher's (a symlink planted in the sandbox
        # must not make root truncate a file elsewhere).
        step = "switch identity"
        if req.get("groups") is not None:
            os.setgroups([int(g) for g in req["groups"]])
        if req.get("gid") is not None:
            os.setgid(int(req["gid"]))
        if req.get("uid") is not None:
            os.setuid(int(req["uid"]))
        step = "enter the sandbox"
        os.chdir(req["cwd"])
        step = "open stdin"
        fd_in = os.open(req.get("stdin") or os.devnull, os.O_RDONLY)
        step = "open stdout"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd_out = os.open(req["stdout"], flags, 0o600)
        step = "open stderr"
        # One file for both: one descriptor, so the two streams share the offset and append to
        # each other instead of overwriting.
        same = os.path.abspath(req["stderr"]) == os.path.abspath(req["stdout"])
        fd_err = fd_out if same else os.open(req["stderr"], flags, 0o600)
        for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
            os.dup2(fd, target)
        for fd in {fd_in, fd_out, fd_err}:
            if fd > 2:
                os.close(fd)
        stdio_ready = True
        step = "reset signals"
        # Ignored signals stay ignored across exec (a job would see EPIPE instead of dying in
        # `producer | head`): back to the defaults. Handlers reset themselves at exec.
        for s in _IGNORED:
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        step = "execute"
        os.execvpe(argv[0], argv, req["env"])
    except BaseException as e:  # noqa: BLE001 - whatever it was, the job did not start
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        if step == "execute":
            message = "cannot execute %r: %s" % (argv[0] if argv else "", reason)
        else:
            message = "cannot %s for %r: %s" % (step, argv[0] if argv else "", reason)
        try:
            os.write(error_w, message.encode("utf-8", "replace")[:2000])
            if stdio_ready:
                os.write(2, ("gwms: " + message + "\n").encode("utf-8", "replace"))
        finally:
            os._exit(127 if step == "execute" and isinstance(e, FileNotFoundError) else 126)


# ---------------------------------------------------------------------------------------------
# The wrapper: a fork of the launcher, one per job


def _wrapper(req: dict, report_w: int) -> None:
    """Start the job and report on it to ``report_w`` until nothing of it is left. Never returns."""
    job_id = req["id"]

    def send(**record: object) -> None:
        record["id"] = job_id
        try:
            os.write(report_w, _encode(record))
        except OSError:
            pass  # the launcher is gone: nobody left to tell, but the job is still to be reaped

    os.setsid()
    _subreaper()
    # Signals are ignored already (inherited from the launcher); SIGTERM too from now on, and
    # SIGCHLD back to the default, without which wait4 would not see the children.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    error_r, error_w = os.pipe2(os.O_CLOEXEC)  # closed by a successful exec: EOF means it runs
    pid = os.fork()
    if pid == 0:
        os.close(error_r)
        os.close(report_w)
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
    send(event="start", pid=os.getpid(), job_pid=pid, exec_error=error.decode("utf-8", "replace") or None)

    leftovers = False
    while True:
        try:
            done, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if done != pid:
            continue
        main = _ru(usage)
        # Dead orphans are not leftovers: reap those already gone, then see whether any
        # process of the job still lives (all of them are our descendants: we are their
        # subreaper, so "none left" is "no children left").
        while True:
            try:
                other, _, _ = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if other == 0:
                leftovers = True
                break
        children = _ru(resource.getrusage(resource.RUSAGE_CHILDREN))
        if not leftovers:
            send(event="exit", status=status, main=main, children=children, done=True)
            os._exit(0)
        send(event="exit", status=status, main=main, children=children, leftovers=True)
    send(event="done", children=_ru(resource.getrusage(resource.RUSAGE_CHILDREN)))
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# The launcher


class _Job:
    __slots__ = ("id", "wrapper", "job_pid", "exited", "done", "status")

    def __init__(self, job_id: int, wrapper: int) -> None:
        self.id = job_id
        self.wrapper = wrapper
        self.job_pid: int | None = None
        self.exited = False
        self.done = False
        self.status: int | None = None


class Launcher:
    def __init__(self, requests: int = 0, out: int = 1) -> None:
        self.requests = requests
        self.out = out
        self.jobs: dict[int, _Job] = {}         # by job id
        self.wrappers: dict[int, _Job] = {}     # by wrapper pid, until reaped
        self.pending: list[bytes] = []          # records for the startd, written once per loop
        self.request_buffer = b""
        self.report_buffer = b""
        self.closing = False

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
        if op == "spawn":
            self.spawn(request)
        elif op == "kill_wrapper":
            job = self.jobs.get(job_id)
            if job is not None and job.wrapper in self.wrappers:  # not reaped: the pid is still it
                try:
                    os.kill(job.wrapper, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            print(f"gwms launcher: unknown request {op!r}", file=sys.stderr)

    def spawn(self, request: dict) -> None:
        job_id = request["id"]
        if job_id in self.jobs:
            self.emit({"id": job_id, "event": "error", "error": "duplicate job id"})
            return
        try:
            argv = request["argv"]
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise ValueError("argv must be a non-empty list of strings")
            pid = os.fork()
        except (OSError, KeyError, ValueError) as e:
            self.emit({"id": job_id, "event": "error", "error": f"cannot start the job: {e}"})
            return
        if pid == 0:
            code = 255
            try:
                self.become_wrapper()
                _wrapper(request, self.report_w)
            except BaseException:  # noqa: BLE001 - a bug here must not run a second launcher loop
                try:
                    os.write(self.report_w, _encode({"id": job_id, "event": "wrapper_error",
                                                     "error": traceback.format_exc()[-1500:]}))
                except OSError:
                    pass
            finally:
                os._exit(code)
        job = _Job(job_id, pid)
        self.jobs[job_id] = job
        self.wrappers[pid] = job

    def become_wrapper(self) -> None:
        """In a fresh fork: drop everything that belongs to the launcher."""
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for fd in (self.report_r, self.wake_r, self.wake_w):
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
                chunk = os.read(self.report_r, 65536)
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
            if event == "start":
                job.job_pid = record.get("job_pid")
            elif event == "exit":
                job.exited = True
                job.done = bool(record.get("done"))
            elif event == "done":
                job.done = True
            elif event == "wrapper_error":
                print(f"gwms launcher: wrapper of job {job.id} failed:\n{record.get('error')}", file=sys.stderr)
                continue  # its end is reported as "lost" when it is reaped
            self.pending.append(line + b"\n")

    def reap(self) -> list[_Job]:
        """Reap every child that has ended; the wrappers among them are returned."""
        reaped = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            job = self.wrappers.pop(pid, None)
            if job is None:
                continue  # an orphan of a job whose wrapper died: we are its subreaper
            job.status = status
            reaped.append(job)

    def settle(self, reaped: list[_Job]) -> None:
        # Called after the reports were read: a wrapper wrote everything it had to say before
        # it exited, so what it did not say by now, it never will.
        for job in reaped:
            del self.jobs[job.id]
            if not job.done:
                self.emit({"id": job.id, "event": "lost", "status": job.status})

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
        # An admin's SIGTERM may end the launcher (the startd then starts another); the
        # wrappers ignore it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.report_r, self.report_w = os.pipe()  # not inherited by exec'ed jobs (PEP 446)
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.requests, self.report_r, self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wakeup fd does the work
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.requests, selectors.EVENT_READ)
        self.selector.register(self.report_r, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
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
                if any(key.fd == self.requests for key, _ in events) and not self.read_requests():
                    self.shutdown()
                    return 0
                # Reap first, then read: what a reaped wrapper wrote before it exited is in the
                # pipe by now, and must be seen before a "lost" is decided for it.
                reaped = self.reap()
                self.read_reports()
                self.settle(reaped)
                self.flush()
        except BrokenPipeError:
            self.shutdown()  # the startd is gone
            return 0


def main() -> int:
    return Launcher().run()


if __name__ == "__main__":
    sys.exit(main())
