"""Lifelines fire when their owner dies by SIGKILL, and only then; one server per data directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.lifeline import DataDirInUse, DataDirLock, Lifeline
from tests import procs

OWNER = """
import sys, time
from storage.lifeline import Lifeline
line = Lifeline(int(sys.argv[1]), __import__("signal").SIGTERM, "test")
print(line.watcher_pid, flush=True)
time.sleep(60)
"""


def test_a_lifeline_signals_its_process_when_the_owner_is_killed(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(victim.pid)], stdout=subprocess.PIPE,
                             cwd=Path(__file__).parents[2])
    try:
        assert owner.stdout is not None
        watcher = int(owner.stdout.readline())
        time.sleep(0.2)
        assert victim.poll() is None  # the owner lives: nothing happens
        t0 = time.monotonic()
        owner.send_signal(signal.SIGKILL)
        assert victim.wait(5) == -signal.SIGTERM
        print(f"\nvictim signalled {time.monotonic() - t0:.3f}s after its owner's SIGKILL")
        assert procs.wait_all_gone({watcher}, 2.0) == set()
    finally:
        owner.kill()
        owner.wait()
        victim.kill()
        victim.wait()


def test_a_disarmed_lifeline_leaves_its_process_alone() -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        line = Lifeline(victim.pid, signal.SIGTERM, "test")
        watcher = line.watcher_pid
        assert watcher is not None and procs.running(watcher)
        line.disarm()
        line.disarm()  # idempotent
        time.sleep(0.2)
        assert victim.poll() is None and not procs.running(watcher)
    finally:
        victim.kill()
        victim.wait()


def test_a_second_server_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path), DataDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(DataDirInUse, match=f"in use by another running server \\(pid {os.getpid()}\\)"):
            second.acquire()
    finally:
        first.release()
    second.acquire()  # free again once released (or once its holder died)
    second.release()
