"""End to end through cloud providers: a Telnyx stream in, transcripts and translations out over SSE,
with PII redacted before anything leaves for a provider, a log, the database or Redis.

The server is the real one (a subprocess, as `make run` starts it), configured only through its
environment to use AssemblyAI, Deepgram and an OpenAI-compatible translator, whose URLs point at
the protocol-faithful fakes in ``tests/fakes`` running on loopback in this test.  The fakes are
scripted: what they "hear" is the script, cut into words by the amount of audio they receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from api.call_session import call_key
from api.tiers import DEFAULT_ORG_ID
from storage.db import Database
from storage.warm import EventBus, WarmStore
from tests.fakes.assemblyai import FakeAssemblyAI
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.openai_compat import FakeOpenAI
from tests.servers import Server, get_json, running_server
from tests.speech import utterances_with_pauses
from tests.sse_client import read_sse
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database
from tests.test_end_to_end import stream_call

CARD = "4111 1111 1111 1111"  # canaries: Luhn-valid card, SSN, e-mail
SSN = "123-45-6789"
EMAIL = "jane.doe@example.com"
CANARIES = [CARD, CARD.replace(" ", ""), SSN, SSN.replace("-", ""), EMAIL]
ENGLISH = [f"hello my card number is {CARD}", f"my social is {SSN} and my email is {EMAIL}"]
SPANISH = ["hola quiero hacer un pago hoy", "me puede llamar mañana por la mañana"]
SPEECH = ["please confirm your account number", "i would like to make a payment today"]


def spanish(text: str) -> str:
    return f"[es] {text}"


def english(text: str) -> str:
    return f"[en] {text}"


@contextlib.asynccontextmanager
async def server_with(tmp_path, env: dict[str, str]) -> AsyncIterator[Server]:  # type: ignore[no-untyped-def]
    cm = running_server(tmp_path, **env)
    server = await asyncio.to_thread(cm.__enter__)  # the fakes share this event loop: never block it
    try:
        yield server
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


@pytest.fixture
async def urls(pg_admin_url: str) -> DbUrls:
    return await migrated_database(pg_admin_url)


async def test_english_call_is_transcribed_redacted_translated_and_no_canary_leaks(
        tmp_path, urls: DbUrls, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    aai = FakeAssemblyAI(ENGLISH, word_ms=60)
    translator = FakeOpenAI(transform=spanish)
    await aai.start()
    await translator.start()
    env = {"SWITCHBOARD_STT_PROVIDER": "assemblyai", "ASSEMBLYAI_API_KEY": "test-key",
           "SWITCHBOARD_ASSEMBLYAI_URL": aai.url, "SWITCHBOARD_TRANSLATION_PROVIDER": "openai",
           "SWITCHBOARD_OPENAI_API_KEY": "test-key", "SWITCHBOARD_OPENAI_BASE_URL": translator.base_url,
           "SWITCHBOARD_PERSIST": "true", "DATABASE_URL": urls.admin,
           "SWITCHBOARD_DATABASE_APP_PASSWORD": APP_PASSWORD, "REDIS_URL": redis_url}
    call_id = "v3:fanout-en"
    try:
        async with server_with(tmp_path, env) as server, aiohttp.ClientSession() as http:
            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
            await asyncio.sleep(0.2)
            await stream_call(server, call_id, utterances_with_pauses(SPEECH, pause_ms=900, rate=8000))
            stream = await asyncio.wait_for(reader, 30)
            stats = get_json(f"{server.http}/api/stats")
            log_text = server.log_path.read_text()
    finally:
        await aai.stop()
        await translator.aclose()

    names = [e.event for e in stream.events]
    assert names[0] == "call.started" and names[-1] == "call.ended"
    started = stream.events[0].json()
    assert (started["language"], started["translate_to"], started["stt_provider"]) == ("en", "es", "assemblyai")
    finals = [e.json() for e in stream.events if e.event == "transcript.final"]
    assert [f["text"] for f in finals] == [
        "Hello my card number is [REDACTED:card].",
        "My social is [REDACTED:ssn] and my email is [REDACTED:email].",
    ]
    translations = {e.json()["seq"]: e.json() for e in stream.events if e.event == "translation.final"}
    assert sorted(translations) == [1, 2]  # every final translated, before call.ended
    for f in finals:
        t = translations[f["seq"]]
        assert (t["original"], t["translated"]) == (f["text"], spanish(f["text"]))
        assert (t["source_lang"], t["target_lang"], t["provider"]) == ("en", "es", "openai")
    assert stream.events[-1].json()["stats"]["redactions"] == 3
    assert stats["translation"]["translated"] == 2 and stats["translation"]["shed"] == 0
    assert (stats["translation"]["marker_fallbacks"], stats["translation"]["markers_lost"]) == (0, 0)

    # Canaries: none in what the SSE client saw, the translator received, the server logged ...
    sse_text = json.dumps([e.data for e in stream.events])
    sent_to_translator = orjson.dumps(translator.requests).decode()
    assert len(translator.requests) == 2
    for canary in CANARIES:
        assert canary not in sse_text
        assert canary not in sent_to_translator
        assert canary not in log_text
    # ... what was stored, and what went to other nodes over Redis.
    db = Database(urls.app, max_size=1)
    await db.open()
    try:
        for _ in range(50):
            async with db.tenant(DEFAULT_ORG_ID) as conn:
                stored = await conn.fetch("SELECT text, words, redacted, language, kind FROM transcriptions "
                                          "ORDER BY seq")
                stored_tr = await conn.fetch("SELECT original_text, translated_text, target_lang, transcription_id "
                                             "FROM translations ORDER BY created_at")
            if len(stored) == 2 and len(stored_tr) == 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await db.aclose()
    assert [r["text"] for r in stored] == [f["text"] for f in finals]
    assert all(r["redacted"] and r["language"] == "en" for r in stored)
    assert [r["kind"] for r in stored] == ["final", "final"]  # utterances with their finals keep no partial
    assert stream.events[-1].json()["stats"]["partials_kept"] == 0
    assert all(r["target_lang"] == "es" and r["transcription_id"] is not None for r in stored_tr)
    warm = WarmStore.from_url(redis_url)
    try:
        bus = await EventBus(warm.redis).read(call_key(DEFAULT_ORG_ID, call_id))
    finally:
        await warm.aclose()
    stored_text = orjson.dumps([dict(r) for r in stored] + [dict(r) for r in stored_tr], default=str).decode()
    bus_text = orjson.dumps([e.payload for e in bus]).decode()
    assert "translation.final" in [e.event for e in bus]
    for canary in CANARIES:
        assert canary not in stored_text
        assert canary not in bus_text


async def test_spanish_call_on_deepgram_gets_english_translations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dg = FakeDeepgram(SPANISH, word_ms=60)
    translator = FakeOpenAI(transform=english)
    await dg.start()
    await translator.start()
    env = {"SWITCHBOARD_STT_CHAIN": '{"en": ["pocketsphinx"], "es": ["deepgram"]}', "DEEPGRAM_API_KEY": "test-key",
           "SWITCHBOARD_DEEPGRAM_URL": dg.url, "SWITCHBOARD_TRANSLATION_PROVIDER": "openai",
           "SWITCHBOARD_OPENAI_API_KEY": "test-key", "SWITCHBOARD_OPENAI_BASE_URL": translator.base_url}
    call_id = "v3:fanout-es"
    try:
        async with server_with(tmp_path, env) as server, aiohttp.ClientSession() as http:
            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
            await asyncio.sleep(0.2)
            await stream_call(server, call_id, utterances_with_pauses(SPEECH, pause_ms=900, rate=8000),
                              query="?language=es")
            stream = await asyncio.wait_for(reader, 30)
    finally:
        await dg.stop()
        await translator.aclose()
    assert dg.connections and dg.connections[0].query["language"] == "es"
    finals = [e.json() for e in stream.events if e.event == "transcript.final"]
    assert [f["text"] for f in finals] == SPANISH
    translated = [e.json() for e in stream.events if e.event == "translation.final"]
    assert [(t["source_lang"], t["target_lang"], t["translated"]) for t in sorted(translated, key=lambda t: t["seq"])
            ] == [("es", "en", english(s[0].upper() + s[1:])) for s in SPANISH]  # truecased for the translator


async def test_primary_out_of_funds_mid_call_fails_over_to_the_next_provider_without_losing_speech(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    aai = FakeAssemblyAI(["never finished"], word_ms=60)
    aai.error_after(4000, 4002)  # half a second into the first utterance: "insufficient funds", not retryable
    dg = FakeDeepgram(["please confirm your account number", "i would like to make a payment today"], word_ms=60)
    await aai.start()
    await dg.start()
    env = {"SWITCHBOARD_STT_CHAIN": '{"en": ["assemblyai", "deepgram"]}', "ASSEMBLYAI_API_KEY": "test-key",
           "SWITCHBOARD_ASSEMBLYAI_URL": aai.url, "DEEPGRAM_API_KEY": "test-key", "SWITCHBOARD_DEEPGRAM_URL": dg.url}
    call_id = "v3:failover"
    try:
        async with server_with(tmp_path, env) as server, aiohttp.ClientSession() as http:
            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
            await asyncio.sleep(0.2)
            await stream_call(server, call_id, utterances_with_pauses(SPEECH, pause_ms=900, rate=8000))
            stream = await asyncio.wait_for(reader, 30)
    finally:
        await aai.stop()
        await dg.stop()
    switch = [e.json() for e in stream.events if e.event == "stt.failover"]
    assert len(switch) == 1 and (switch[0]["from"], switch[0]["to"]) == ("assemblyai", "deepgram")
    finals = [e.json() for e in stream.events if e.event == "transcript.final"]
    # Deepgram got the first utterance from its start (replayed), so both come out whole.
    assert [f["text"] for f in finals] == ["please confirm your account number", "i would like to make a payment today"]
    assert stream.events[-1].json()["stats"]["stt_failovers"] == 1
    assert stream.events[0].json()["stt_provider"] == "assemblyai+deepgram"


async def test_an_utterance_cut_off_by_its_recogniser_keeps_its_last_partial_once_and_redacted(
        tmp_path, urls: DbUrls, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    aai = FakeAssemblyAI([f"my card number is {CARD} thanks"], word_ms=60)
    aai.error_after(5000, 4002)  # every word heard (9 x 480 bytes), then "insufficient funds" before the turn ends
    await aai.start()
    env = {"SWITCHBOARD_STT_PROVIDER": "assemblyai", "ASSEMBLYAI_API_KEY": "test-key",
           "SWITCHBOARD_ASSEMBLYAI_URL": aai.url, "SWITCHBOARD_TRANSLATION_PROVIDER": "none",
           "SWITCHBOARD_PERSIST": "true", "DATABASE_URL": urls.admin,
           "SWITCHBOARD_DATABASE_APP_PASSWORD": APP_PASSWORD, "REDIS_URL": redis_url,
           "SWITCHBOARD_SSE_REDACTED": "false"}  # agents may see raw text: what is stored never is
    call_id = "v3:cut-off"
    try:
        async with server_with(tmp_path, env) as server, aiohttp.ClientSession() as http:
            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
            await asyncio.sleep(0.2)
            await stream_call(server, call_id, utterances_with_pauses(SPEECH, pause_ms=900, rate=8000))
            stream = await asyncio.wait_for(reader, 30)
            detail = (await asyncio.to_thread(get_json, f"{server.http}/api/calls/{call_id}"))["data"]
    finally:
        await aai.stop()
    names = [e.event for e in stream.events]
    assert "transcript.partial" in names and "transcript.final" not in names and "stt.failed" in names
    assert stream.events[-1].json()["stats"]["partials_kept"] == 1
    db = Database(urls.app, max_size=1)
    await db.open()
    try:
        async with db.tenant(DEFAULT_ORG_ID) as conn:
            rows = await conn.fetch("SELECT kind, track, seq, stream_id, text, words, redacted FROM transcriptions")
    finally:
        await db.aclose()
    assert len(rows) == 1  # one row for the utterance, not one per partial
    row = rows[0]
    assert (row["kind"], row["track"], row["seq"], row["redacted"]) == ("partial", "inbound", 1, True)
    assert row["stream_id"] == stream.events[0].json()["stream_id"]
    assert row["text"] == "my card number is [REDACTED:card] thanks"
    stored_text = orjson.dumps([dict(r) for r in rows], default=str).decode()
    for canary in CANARIES:
        assert canary not in stored_text
    assert [(t["kind"], t["seq"], t["text"]) for t in detail["transcripts"]] == [
        ("partial", 1, "my card number is [REDACTED:card] thanks")]
