"""Ties between this process and what it leaves on the machine: lifelines and the data-directory lock.

**Lifeline.**  A process this server starts must not outlive it, even when the server is killed
with SIGKILL (no ``finally``, no ``atexit``).  For the embedded servers, the tie is a pipe:

    server (holds the write end, never inherited)  ──pipe──▶  sh -c 'cat >/dev/null; kill -s SIG PID'

The watcher blocks in ``cat`` on the read end.  The kernel closes the write end when the server
process is gone, however it died, so ``cat`` sees end-of-file and the watcher sends ``SIG`` to the
server it watches, then exits.  It runs in a session of its own, so a terminal's Ctrl-C or hang-up
does not take it first.  Why not ``prctl(PR_SET_PDEATHSIG)``: PostgreSQL is daemonised by
``pg_ctl`` (the postmaster's parent is init, not us); and the parent-death signal follows the
*thread* that forked the child, while the embedded servers are started and restarted from worker
threads of the event loop's executor.  The pipe depends on neither.  A watcher costs one ``sh`` and
one ``cat`` (about 1 MB).

**Data-directory lock.**  One server per data directory: the embedded servers, the spool and the
node's identity live there.  ``DataDirLock`` holds ``flock`` on ``<data_dir>/switchboard.lock`` for
the life of the process (the kernel drops it when the process dies, SIGKILL included), so a
start-up that takes it knows that anything else found in the directory (a running postmaster, a
Valkey, spool files) was left by a run that is over, and may be stopped or recovered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
from pathlib import Path

log = logging.getLogger("switchboard.lifeline")

_WATCHER = 'cat >/dev/null; kill -s "$1" "$2" 2>/dev/null'


class Lifeline:
    """Sends ``sig`` to ``pid`` when this process dies.  ``disarm`` before stopping ``pid`` yourself."""

    def __init__(self, pid: int, sig: signal.Signals, label: str) -> None:
        self.pid = pid
        self.label = label
        read_end, self._write_end = os.pipe()  # both non-inheritable (PEP 446)
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                ["/bin/sh", "-c", _WATCHER, f"switchboard-lifeline:{label}", sig.name.removeprefix("SIG"), str(pid)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    @property
    def watcher_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def disarm(self) -> None:
        """Stop watching (the watcher exits without signalling).  Idempotent."""
        if self._proc is None:
            return
        self._proc.kill()  # first: closing the pipe alone would make it send the signal
        self._proc.wait()
        self._proc = None
        os.close(self._write_end)


class DataDirInUse(RuntimeError):
    """Another running server holds the data directory."""


class DataDirLock:
    """``flock`` on ``<data_dir>/switchboard.lock``; the file also names the holder's pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "switchboard.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``DataDirInUse`` (never waits).  Blocking file I/O."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirInUse(f"{self.path.parent} is in use by another running server (pid {holder or '?'}); "
                               "give each server its own SWITCHBOARD_DATA_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
