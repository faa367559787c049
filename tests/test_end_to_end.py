"""End to end on the real server: a Telnyx stream of real speech in, transcripts out over SSE,
and the call, its final transcripts, its recording and its events kept in the storage tiers.

The server runs as a subprocess exactly as `make run` starts it (with a domain phrase list), its
tiers pointed at the test session's real PostgreSQL, Valkey and S3 (weed mini) servers.  The test
connects a WebSocket as Telnyx does (connected, start, mu-law 8 kHz in 20 ms media messages paced
in real time, stop), reads the call's SSE stream over HTTP, then reads back what was stored.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile

from api.call_session import call_key
from api.simulator import telnyx_messages
from api.tiers import DEFAULT_ORG_ID
from storage.blobs import S3BlobStore
from storage.db import Database
from storage.warm import EventBus, WarmStore
from tests.conftest import S3Endpoint
from tests.servers import API_KEY, MEDIA_TOKEN, Server, running_server
from tests.speech import utterances_with_pauses, word_error_rate
from tests.sse_client import read_sse
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database
from tests.telnyx_client import connect as connect_media
from tests.telnyx_client import send_paced

SENTENCES = [
    "please confirm your account number",
    "i would like to make a payment today",
    "can you call me back tomorrow morning",
]
# Stated bound: pocketsphinx on synthetic espeak speech through G.711 at 8 kHz, upsampled to
# 16 kHz, with a domain LM built from the phrase list: 20-45 % is what this set-up gives; we measured
# 0.35-0.40 over the three sentences (2026-11-29).  The bound is the top of that range.
MAX_WER = 0.45


BUCKET = "e2e-recordings"


@pytest.fixture(scope="module")
def db_urls(pg_admin_url: str) -> DbUrls:
    return asyncio.run(migrated_database(pg_admin_url))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, db_urls: DbUrls, redis_url: str,
           s3_endpoint: S3Endpoint) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("e2e")
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    with running_server(tmp, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_SSE_HEARTBEAT_S="1", SWITCHBOARD_PERSIST="true",
                        DATABASE_URL=db_urls.admin, SWITCHBOARD_DATABASE_APP_PASSWORD=APP_PASSWORD,
                        REDIS_URL=redis_url, S3_ENDPOINT_URL=s3_endpoint.endpoint,
                        S3_ACCESS_KEY_ID=s3_endpoint.access_key, S3_SECRET_ACCESS_KEY=s3_endpoint.secret_key,
                        SWITCHBOARD_S3_BUCKET=BUCKET) as srv:
        srv.extra.update(db_urls=db_urls, s3=s3_endpoint, redis_url=redis_url)
        yield srv


async def stream_call(server: Server, call_id: str, pcm: np.ndarray, encoding: str = "PCMU", query: str = "") -> None:
    messages = telnyx_messages(pcm, call_id=call_id, stream_id=f"stream-{call_id}", encoding=encoding,
                               sample_rate=8000, token=None)
    async with connect_media(server.ws + query) as ws:
        await send_paced(ws, messages)
        await ws.wait_closed()
        assert ws.close_code == 1000


@pytest.mark.parametrize("encoding", ["PCMU", "PCMA"])
async def test_telnyx_speech_stream_yields_partials_and_finals_within_the_wer_bound(
    server: Server, encoding: str
) -> None:
    pcm = utterances_with_pauses(SENTENCES, pause_ms=900, rate=8000)
    call_id = f"v3:e2e-{encoding}"
    async with aiohttp.ClientSession() as http:
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
        await asyncio.sleep(0.2)
        await stream_call(server, call_id, pcm, encoding)
        stream = await asyncio.wait_for(reader, 60)
    names = [e.event for e in stream.events]
    assert names[0] == "call.started" and names[-1] == "call.ended"
    finals = [e.json() for e in stream.events if e.event == "transcript.final"]
    partials = [e.json() for e in stream.events if e.event == "transcript.partial"]
    assert len(finals) == len(SENTENCES), [f["text"] for f in finals]
    assert partials, "no interim results were delivered"
    hypothesis = " ".join(f["text"] for f in finals)
    wer = word_error_rate(" ".join(SENTENCES), hypothesis)
    print(f"\n{encoding} WER {wer:.2f}: {hypothesis!r}")
    assert wer <= MAX_WER
    ids = [int(e.id or 0) for e in stream.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for n, f in enumerate(finals, start=1):
        assert f["call_id"] == call_id and f["track"] == "inbound" and f["seq"] == n
        starts = [w["start"] for w in f["words"]]
        assert starts == sorted(starts) and all(f["start"] <= w["start"] <= w["end"] <= f["end"] + 20
                                                 for w in f["words"])
    # Utterance n begins after the (n-1)th pause: its stream-relative timing must reflect that.
    assert finals[0]["start"] < finals[1]["start"] < finals[2]["start"]
    ended = stream.events[-1].json()
    assert ended["stats"]["stt_dropped"] == 0 and ended["stats"]["finals"] == len(SENTENCES)
    await check_stored(server, call_id, finals, len(pcm))


async def check_stored(server: Server, call_id: str, finals: list[dict], samples: int) -> None:  # type: ignore[type-arg]
    """What SSE delivered is what the tiers hold: call row, final transcripts, audit, recording, bus."""
    db_urls: DbUrls = server.extra["db_urls"]
    db = Database(db_urls.app, max_size=1)
    await db.open()
    try:
        for _ in range(100):  # the writer batches; the recording uploads after the call
            async with db.tenant(DEFAULT_ORG_ID) as conn:
                call = await conn.fetchrow("SELECT * FROM calls WHERE call_control_id = $1", call_id)
                rec = await conn.fetchrow("SELECT * FROM recordings WHERE call_id = $1", call["id"]) if call else None
            if call is not None and call["status"] == "completed" and rec is not None:
                break
            await asyncio.sleep(0.1)
        assert call is not None and call["status"] == "completed" and call["end_reason"] == "stop"
        assert call["codec"] in ("PCMU", "PCMA") and call["started_at"] < call["ended_at"]
        async with db.tenant(DEFAULT_ORG_ID) as conn:
            stored = await conn.fetch("SELECT seq, text, track, start_ms, end_ms FROM transcriptions "
                                      "WHERE call_id = $1 ORDER BY seq", call["id"])
            audit = [r["action"] for r in await conn.fetch(
                "SELECT action FROM audit_logs WHERE resource_id = $1 OR resource_id = $2 ORDER BY created_at",
                str(call["id"]), rec["storage_key"])]
        assert [(r["seq"], r["text"], r["track"], r["start_ms"], r["end_ms"]) for r in stored] == [
            (f["seq"], f["text"], f["track"], f["start"], f["end"]) for f in finals]
        assert audit == ["call.started", "call.ended", "recording.stored"]
    finally:
        await db.aclose()
    s3: S3Endpoint = server.extra["s3"]
    blobs = S3BlobStore(s3.endpoint, BUCKET, s3.access_key, s3.secret_key)
    await blobs.start()
    try:
        wav = await blobs.get(rec["storage_key"])
    finally:
        await blobs.aclose()
    data, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert rate == 8000 and data.shape[1] == 2 and rec["channels"] == 2
    assert abs(len(data) - samples) <= 160  # the whole call, to the frame
    assert rec["bytes"] == len(wav) and rec["duration_ms"] == len(data) * 1000 // 8000
    assert np.abs(data[:, 0]).max() > 1000  # the consumer's speech is in channel 0
    warm = WarmStore.from_url(server.extra["redis_url"])
    try:
        events = await EventBus(warm.redis).read(call_key(DEFAULT_ORG_ID, call_id))  # the bus is keyed per organisation
    finally:
        await warm.aclose()
    names = [e.event for e in events]
    assert names == ["call.started", *["transcript.final"] * len(finals), "call.ended"]
    assert [e.payload["text"] for e in events[1:-1]] == [f["text"] for f in finals]


async def test_simulate_call_command_streams_a_wav_and_prints_the_transcript(server: Server, tmp_path: Path) -> None:
    wav = tmp_path / "call.wav"
    soundfile.write(wav, utterances_with_pauses(SENTENCES[:2], pause_ms=900, rate=16000), 16000, subtype="PCM_16")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "simulate-call", str(wav), "--url", server.ws, "--call-id", "v3:sim",
        "--token", MEDIA_TOKEN, "--api-key", API_KEY,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = [line for line in out.decode().splitlines() if line.startswith("[")]
    assert len(lines) == 2, out.decode()
    wer = word_error_rate(" ".join(SENTENCES[:2]), " ".join(line.split("] ", 1)[1] for line in lines))
    # Two sentences only, one word weighs 8%; measured 0.38-0.54 on this path (16 kHz WAV resampled
    # to 8 kHz by the simulator, then G.711).  This test proves the command works end to end; the
    # recognition bound proper is MAX_WER in the test above.
    assert wer <= 0.6, out.decode()
