"""A PostgreSQL outage in the middle of a live call loses nothing, and stops no new call.

The real server runs against a PostgreSQL of the test's own (so the test may stop it).  A call of
three spoken sentences streams in real time; the database is stopped as soon as the first final
transcript reaches SSE and started again after the second, so that transcript and the call's end
bookkeeping are produced while it is down.  Afterwards every final is stored, in order.  A new
call whose media token the node has seen before is admitted while the database is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from api.tiers import DEFAULT_ORG_ID
from storage import embedded
from storage.db import Database
from tests.servers import METRICS_TOKEN, Server, get_json, running_server
from tests.speech import utterances_with_pauses
from tests.sse_client import SseEvent, read_sse
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database
from tests.test_end_to_end import SENTENCES, stream_call


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embedded.EmbeddedPostgres]:
    server = embedded.start_postgres(tmp_path_factory.mktemp("pg-outage") / "data")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pg: embedded.EmbeddedPostgres,
           redis_url: str) -> Iterator[Server]:
    urls = asyncio.run(migrated_database(pg.uri))
    tmp = tmp_path_factory.mktemp("outage")
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    with running_server(tmp, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_PERSIST="true", DATABASE_URL=urls.admin,
                        SWITCHBOARD_MEDIA_TOKEN_CACHE_S="0.5",
                        SWITCHBOARD_DATABASE_APP_PASSWORD=APP_PASSWORD, REDIS_URL=redis_url) as srv:
        srv.extra["db_urls"] = urls
        yield srv


async def test_final_transcripts_survive_a_database_restart_mid_call(
        server: Server, pg: embedded.EmbeddedPostgres, tmp_path: Path) -> None:
    call_id = "v3:outage"
    pcm = utterances_with_pauses(SENTENCES, pause_ms=1500, rate=8000)
    outage: list[asyncio.Task[None]] = []
    finals_seen = 0

    def on_event(ev: SseEvent) -> None:
        nonlocal finals_seen
        if ev.event != "transcript.final":
            return
        finals_seen += 1
        if finals_seen == 1:
            outage.append(asyncio.create_task(asyncio.to_thread(pg.stop)))
        elif finals_seen == 2:
            outage.append(asyncio.create_task(restart_after(outage[0])))

    async def restart_after(stopping: asyncio.Task[None]) -> None:
        await stopping
        await asyncio.to_thread(pg.start)

    async with aiohttp.ClientSession() as http:
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events", on_event=on_event))
        await asyncio.sleep(0.2)
        await stream_call(server, call_id, pcm)
        stream = await asyncio.wait_for(reader, 60)
        await asyncio.gather(*outage)
    finals = [e.json() for e in stream.events if e.event == "transcript.final"]
    assert len(finals) == 3 and len(outage) == 2

    urls: DbUrls = server.extra["db_urls"]
    db = Database(urls.app, max_size=1)
    await db.open()
    try:
        for _ in range(100):  # the writer retries with backoff (at most 2 s apart)
            async with db.tenant(DEFAULT_ORG_ID) as conn:
                status = await conn.fetchval("SELECT status FROM calls WHERE call_control_id = $1", call_id)
                stored = await conn.fetch("SELECT seq, text FROM transcriptions t JOIN calls c ON c.id = t.call_id "
                                          "WHERE c.call_control_id = $1 ORDER BY seq", call_id)
            if status == "completed" and len(stored) == 3:
                break
            await asyncio.sleep(0.1)
    finally:
        await db.aclose()
    assert status == "completed"
    assert [(r["seq"], r["text"]) for r in stored] == [(f["seq"], f["text"]) for f in finals]
    persistence = get_json(f"{server.http}/api/stats")["persistence"]
    assert persistence["writer_retries"] > 0, persistence  # the outage was real and was ridden out
    assert persistence["writer_dropped"] == 0 and persistence["writer_rejected"] == 0
    assert persistence["writer_pending"] == 0


async def test_a_known_media_token_admits_new_calls_while_the_database_is_down(
        server: Server, pg: embedded.EmbeddedPostgres) -> None:
    pcm = utterances_with_pauses(SENTENCES[:1], pause_ms=300, rate=8000)
    await stream_call(server, "v3:before-outage", pcm)  # the node looks the token up, and remembers it
    await asyncio.to_thread(pg.stop)
    try:
        await asyncio.sleep(1.0)  # past media_token_cache_s: the node asks PostgreSQL again, which is down
        await stream_call(server, "v3:during-outage", pcm)  # closes 1000 after its stop (asserted there)
        stats = get_json(f"{server.http}/api/stats", token=METRICS_TOKEN)  # needs no database
    finally:
        await asyncio.to_thread(pg.start)
    assert stats["auth"]["media_token_stale_hits"] >= 1, stats["auth"]
