"""SIGTERM mid-call on the real server: it drains.  New streams are refused, the open utterance's
final is still delivered, SSE viewers get ``call.ended {reason: "server_shutdown"}``, the stored
end reason says the same, and the process exits within the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import websockets

from api.simulator import telnyx_messages
from api.tiers import DEFAULT_ORG_ID
from storage.db import Database
from tests.servers import running_server
from tests.speech import utterances_with_pauses
from tests.sse_client import read_sse
from tests.storage.conftest import APP_PASSWORD, migrated_database
from tests.telnyx_client import connect as connect_media
from tests.telnyx_client import send_paced

GRACE_S = 8.0


async def test_sigterm_drains_live_calls_with_server_shutdown(tmp_path: Path, pg_admin_url: str,
                                                              redis_url: str) -> None:
    db_urls = await migrated_database(pg_admin_url)
    pcm = utterances_with_pauses(["please confirm your account number", "i would like to make a payment today"])
    messages = telnyx_messages(pcm, call_id="v3:drain", stream_id="s-drain", encoding="PCMU", sample_rate=8000,
                               token=None)[:-1]  # no stop: the call is live when the server is told to stop
    with running_server(tmp_path, SWITCHBOARD_STT_PROVIDER="null", SWITCHBOARD_PERSIST="true",
                        DATABASE_URL=db_urls.admin, SWITCHBOARD_DATABASE_APP_PASSWORD=APP_PASSWORD,
                        REDIS_URL=redis_url, SWITCHBOARD_SHUTDOWN_GRACE_S=str(GRACE_S)) as server:
        async with aiohttp.ClientSession() as http:
            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/v3:drain/events"))
            await asyncio.sleep(0.2)
            ws = await connect_media(server.ws)
            sent = await send_paced(ws, messages, for_s=1.5)  # stops mid-way through the first sentence
            server.proc.send_signal(signal.SIGTERM)
            term_at = time.monotonic()
            try:
                while True:  # the socket is closed by the server, going away
                    await asyncio.wait_for(ws.recv(), GRACE_S + 5)
            except websockets.ConnectionClosed:
                pass
            assert ws.close_code == 1001 and ws.close_reason == "server shutting down"
            stream = await asyncio.wait_for(reader, GRACE_S + 5)
        await asyncio.to_thread(server.proc.wait, GRACE_S + 10)
        exited_s = time.monotonic() - term_at
    names = [e.event for e in stream.events]
    assert names == ["call.started", "transcript.final", "call.ended"], names  # the open utterance's final is owed
    ended = stream.events[-1].json()
    assert ended["reason"] == "server_shutdown" and ended["status"] == "failed"
    assert ended["stats"]["frames"] == sent
    assert exited_s < GRACE_S + 5, exited_s
    print(f"\nSIGTERM -> exit {exited_s:.2f} s")
    logs = server.logs()
    drained = [r for r in logs if r.get("event") == "server.drained"]
    assert drained and drained[0]["calls"] == 1 and drained[0]["unfinished"] == 0
    db = Database(db_urls.app, max_size=1)
    await db.open()
    try:
        async with db.tenant(DEFAULT_ORG_ID) as conn:
            row = await conn.fetchrow("SELECT status, end_reason FROM calls WHERE call_control_id = 'v3:drain'")
    finally:
        await db.aclose()
    assert row is not None and (row["status"], row["end_reason"]) == ("failed", "server_shutdown")


async def test_a_draining_server_refuses_new_streams(tmp_path: Path) -> None:
    with running_server(tmp_path, SWITCHBOARD_STT_PROVIDER="null", SWITCHBOARD_SHUTDOWN_GRACE_S="5") as server:
        live = await connect_media(server.ws)
        for m in telnyx_messages(utterances_with_pauses(["hello"])[:1600], call_id="v3:live", stream_id="s-live",
                                 encoding="PCMU", sample_rate=8000, token=None)[:-1]:
            await live.send(m)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises((OSError, websockets.InvalidStatus, websockets.InvalidHandshake)):
            await connect_media(server.ws, open_timeout=2)
        await asyncio.to_thread(server.proc.wait, 15)
        assert server.proc.returncode == 0


async def test_ctrl_c_to_the_whole_process_group_still_delivers_the_owed_final(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's job, decoders included: the server drains, and
    the decoder it needs for the owed final is still there."""
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("please confirm your account number\ni would like to make a payment today\n")
    pcm = utterances_with_pauses(["please confirm your account number"])
    messages = telnyx_messages(pcm, call_id="v3:ctrl-c", stream_id="s-ctrl-c", encoding="PCMU", sample_rate=8000,
                               token=None)[:-1]
    with running_server(tmp_path, new_session=True, SWITCHBOARD_STT_PROVIDER="pocketsphinx",
                        SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_SHUTDOWN_GRACE_S=str(GRACE_S)) as server:
        async with aiohttp.ClientSession() as http:
            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/v3:ctrl-c/events"))
            await asyncio.sleep(0.2)
            ws = await connect_media(server.ws)
            await send_paced(ws, messages, for_s=1.8)  # inside the sentence: the utterance is open
            os.killpg(server.proc.pid, signal.SIGINT)
            stream = await asyncio.wait_for(reader, GRACE_S + 5)
            await ws.close()
        await asyncio.to_thread(server.proc.wait, GRACE_S + 10)
    names = [e.event for e in stream.events if e.event != "transcript.partial"]
    assert names == ["call.started", "transcript.final", "call.ended"], names
    ended = stream.events[-1].json()
    assert ended["reason"] == "server_shutdown" and ended["stats"]["stt_failed_utterances"] == 0
    final = next(e.json() for e in stream.events if e.event == "transcript.final")
    assert final["text"], final  # decoded, not an empty stand-in
