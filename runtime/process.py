"""Worker processes: spawning one, noticing its exit, its output, killing and reaping.

A worker is ``python -m llamafleet.worker`` with its :class:`~protocol.WorkerSpec`
as JSON in ``$LLAMAFLEET_WORKER_SPEC``. Its stdout and stderr are read by a thread
that forwards each line to the ``llamafleet.worker.<model>`` logger and keeps the
last lines for the exit report. A pidfd (Linux >= 5.3) becomes readable when the
process exits, so a poller wakes on exits instead of polling for them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import IO

from llamafleet.runtime import protocol

#: lines of a worker's output kept for its exit report
LOG_TAIL_LINES = 40
#: how long an exit report may wait for the worker's last output lines (seconds)
LOG_DRAIN_TIMEOUT = 2.0


def describe_exit(returncode: int) -> str:
    """A human description of a process exit status."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


def crash_detail(tail: Iterable[str]) -> str | None:
    """The most telling line of a dead worker's output (native crash, traceback)."""
    lines = list(tail)
    for marker in ("Fatal Python error", "GGML_ASSERT", "terminate called", "error:"):
        for line in reversed(lines):
            if marker in line:
                return line.strip()[:300]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()[:300]
    return None


def new_log_tail() -> deque[str]:
    """An empty output tail of :data:`LOG_TAIL_LINES` lines."""
    return deque(maxlen=LOG_TAIL_LINES)


def set_parent_death_signal() -> None:
    """In a child: ask Linux to SIGKILL us when our parent (the supervisor) dies
    (best effort; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where unsupported."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def pump_log(model: str, stream: IO[bytes], tail: deque[str], eof: threading.Event,
             on_eof: Callable[[], None]) -> None:
    """Forward a worker's output to our log and keep its tail; at EOF set ``eof``
    and call ``on_eof`` (an exit report may be waiting for the last lines)."""
    wlog = logging.getLogger(f"llamafleet.worker.{model}")
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        if line:
            tail.append(line)
            wlog.info("%s", line)
    stream.close()
    eof.set()
    on_eof()


class WorkerProcess:
    """One running (or exited, not yet reaped) worker process."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int | None,
                 log_eof: threading.Event) -> None:
        self.popen = popen
        #: readable when the process exits; None where pidfds are not available
        self.pidfd = pidfd
        #: set when the output thread reached EOF
        self.log_eof = log_eof
        #: why we killed it, if we did (reported instead of the signal)
        self.kill_reason: str | None = None
        #: when the exit was first seen while the output was still being read
        self.exited_at: float | None = None

    @classmethod
    def spawn(cls, spec: protocol.WorkerSpec, tail: deque[str],
              on_output_end: Callable[[], None]) -> WorkerProcess:
        """Start ``python -m llamafleet.worker`` for ``spec``; its output lines go to
        ``tail``. Raises OSError when the process cannot be started."""
        return cls.start("llamafleet.worker", spec.model, protocol.WORKER_SPEC_ENV, spec,
                         tail, on_output_end)

    @classmethod
    def start(cls, module: str, name: str, spec_env: str, spec: protocol.Message,
              tail: deque[str], on_output_end: Callable[[], None],
              pass_fds: tuple[int, ...] = ()) -> WorkerProcess:
        """Start ``python -m module`` with ``spec`` as JSON in ``$spec_env``; its output
        goes to the ``llamafleet.worker.<name>`` logger and ``tail``. ``pass_fds`` are
        inherited (the gateway's listening socket). Raises OSError."""
        env = dict(os.environ)
        env[spec_env] = json.dumps(spec.to_wire())
        popen = subprocess.Popen(
            [sys.executable, "-m", module], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            close_fds=True, pass_fds=pass_fds)
        assert popen.stdout is not None
        eof = threading.Event()
        proc = cls(popen, pidfd_open(popen.pid), eof)
        threading.Thread(target=pump_log, args=(name, popen.stdout, tail, eof,
                                                on_output_end),
                         daemon=True, name=f"log-{name}").start()
        return proc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def watch_fd(self) -> int | None:
        """The fd a poller should watch for this exit (None: poll, or exit seen)."""
        return self.pidfd if self.exited_at is None else None

    @property
    def drain_deadline(self) -> float | None:
        """When an exit seen before the last output gets reported anyway."""
        return None if self.exited_at is None else self.exited_at + LOG_DRAIN_TIMEOUT

    def output_pending(self, now: float) -> bool:
        """Whether an exited worker's last output lines (a fatal error's traceback) are
        still being read: its pidfd reports the exit at once, before the pump is done."""
        if self.log_eof.is_set():
            self.exited_at = None
            return False
        if self.exited_at is None:
            self.exited_at = now
        if now - self.exited_at < LOG_DRAIN_TIMEOUT:
            return True
        self.exited_at = None  # a stuck pipe: report without the rest
        return False

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL it; ``reason`` becomes its exit report."""
        if reason is not None:
            self.kill_reason = reason
        try:
            self.popen.kill()
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        """SIGTERM it: the worker drains and exits."""
        try:
            self.popen.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def reap(self) -> str:
        """Wait for the exit, release the pidfd; returns the exit report."""
        rc = self.popen.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return self.kill_reason or describe_exit(rc)
