"""A call whose stream stops mid-utterance, with a recogniser that never delivers the utterance's final
before the drain deadline: the server (in process, real PostgreSQL) keeps exactly one row for that
utterance, its last partial, redacted; a partial is never a row of its own while the call runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from api.app import make_app, open_runtime
from api.auth import BOOTSTRAP_ORG_ID
from api.settings import Settings
from api.simulator import telnyx_messages
from engine.frames import AudioFrame
from pipelines.stt.base import Emit, SessionOptions, SttProvider, SttSession, Transcript
from storage.db import Database
from tests.servers import API_KEY, MEDIA_TOKEN
from tests.speech import utterances_with_pauses
from tests.sse_client import read_sse
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database

SAID = "my card number is 4111 1111 1111 1111 and the expiry is"


class _Owing(SttSession):
    """Shows a partial every 100 ms of speech (one more word each time); owes the final and never gives it."""

    sample_rate = 8000
    max_buffer_ms = 0

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.frames = 0
        self.start_ms: int | None = None

    def push(self, frame: AudioFrame) -> None:
        self.frames += 1
        self.start_ms = frame.timestamp_ms if self.start_ms is None else self.start_ms
        if self.frames % 5 == 0:
            words = SAID.split()[: self.frames // 5]
            self._emit(Transcript(" ".join(words), False, self.start_ms, frame.end_ms, utterance=1))

    def finalize(self) -> None:
        pass  # the final is owed from here on

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        await asyncio.sleep(min(drain_timeout, 1.0))  # waits for it in vain, then the deadline passes


class Owing(SttProvider):
    name = "owing"
    sample_rate = 8000

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        return _Owing(emit)


@pytest.fixture
async def urls(pg_admin_url: str) -> DbUrls:
    return await migrated_database(pg_admin_url)


async def test_a_stream_stopped_mid_utterance_without_a_final_keeps_one_redacted_partial_row(
        aiohttp_client, monkeypatch, tmp_path: Path, urls: DbUrls, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", urls.admin)
    monkeypatch.setenv("SWITCHBOARD_DATABASE_APP_PASSWORD", APP_PASSWORD)
    monkeypatch.setenv("REDIS_URL", redis_url)
    settings = Settings(persist=True, data_dir=tmp_path / "data", recording_enabled=False,  # type: ignore[call-arg]
                        translation_provider="none", telnyx_stream_token=MEDIA_TOKEN, bootstrap_api_key=API_KEY,
                        sse_redacted=False)  # agents may see the raw words: storage never does
    client = await aiohttp_client(make_app(await open_runtime(settings, stt=Owing())))
    call_id = "v3:cut-mid-utterance"
    pcm = utterances_with_pauses(["please confirm your account number"], pause_ms=500, rate=8000)
    messages = telnyx_messages(pcm[: 8000 * 17 // 10], call_id=call_id, stream_id="st-1", encoding="PCMU",
                               sample_rate=8000, token=MEDIA_TOKEN)  # the pause, 1.2 s of speech, then `stop`
    reader = asyncio.create_task(read_sse(client.session, str(client.make_url(f"/api/calls/{call_id}/events"))))
    await asyncio.sleep(0.2)
    ws = await client.ws_connect("/api/media/telnyx")
    t0 = asyncio.get_running_loop().time()
    for i, m in enumerate(messages):  # in real time, as Telnyx sends
        await asyncio.sleep(max(0.0, t0 + max(0, i - 2) * 0.02 - asyncio.get_running_loop().time()))
        await ws.send_str(m)
    msg = await ws.receive()
    assert ws.close_code == 1000, msg
    stream = await asyncio.wait_for(reader, 20)
    partials = [e.json() for e in stream.events if e.event == "transcript.partial"]
    assert len(partials) >= 5 and "transcript.final" not in [e.event for e in stream.events]
    assert "4111 1111 1111 1111" in partials[-1]["text"]  # the agents' choice: raw over SSE
    ended = stream.events[-1].json()
    assert ended["reason"] == "stop" and ended["stats"]["partials_kept"] == 1

    db = Database(urls.app, max_size=1)
    await db.open()
    try:
        for _ in range(50):
            async with db.tenant(BOOTSTRAP_ORG_ID) as conn:
                rows = await conn.fetch("SELECT kind, stream_id, track, seq, text, words, redacted FROM transcriptions")
            if rows:
                break
            await asyncio.sleep(0.1)
    finally:
        await db.aclose()
    assert len(rows) == 1  # one row for the utterance, none per partial
    row = rows[0]
    assert (row["kind"], row["stream_id"], row["track"], row["seq"], row["redacted"]) == (
        "partial", "st-1", "inbound", 1, True)
    assert row["text"] == partials[-1]["text"].replace("4111 1111 1111 1111", "[REDACTED:card]")
    assert "4111" not in row["text"] and "4111" not in str(row["words"])
