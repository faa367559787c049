"""Processes as /proc shows them, for tests that check nothing was left running."""

from __future__ import annotations

import os
import time
from pathlib import Path


def state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:][:1].decode()


def running(pid: int) -> bool:
    """Exists and has not exited (a zombie has: only its exit status waits to be collected)."""
    return state(pid) not in (None, "Z", "X")


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> set[int]:
    """Every running process below ``root`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        ppid = parent(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out and running(child):
                out.add(child)
                todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def referencing(text: str) -> set[int]:
    """Running processes whose command line contains ``text`` (a data directory, say)."""
    return {pid for pid in all_pids() if text in cmdline(pid) and running(pid) and pid != os.getpid()}


def wait_all_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` runs; returns those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if running(p)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
