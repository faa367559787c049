"""Two nodes, one Redis: an SSE client on node B follows a call whose media stream is on node A.

Both nodes are real servers (subprocesses) sharing PostgreSQL and Valkey.  The call streams real
speech into A; the client on B subscribed before the call started.  B must deliver the same
lifecycle and final events as A, under the same ids, so a client can resume on either node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from tests.servers import Server, get_json, running_server
from tests.speech import utterances_with_pauses
from tests.sse_client import read_sse
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database
from tests.test_end_to_end import SENTENCES, stream_call


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str, redis_url: str) -> Iterator[list[Server]]:
    urls: DbUrls = asyncio.run(migrated_database(pg_admin_url))
    tmp = tmp_path_factory.mktemp("nodes")
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    env = dict(SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
               SWITCHBOARD_STT_MAX_DECODERS="1", SWITCHBOARD_PERSIST="true", DATABASE_URL=urls.admin,
               SWITCHBOARD_DATABASE_APP_PASSWORD=APP_PASSWORD, REDIS_URL=redis_url)
    with running_server(tmp_path_factory.mktemp("node-a"), **env) as a, \
            running_server(tmp_path_factory.mktemp("node-b"), **env) as b:
        yield [a, b]


async def test_a_client_on_another_node_gets_the_calls_events_under_the_same_ids(nodes: list[Server]) -> None:
    a, b = nodes
    call_id = "v3:two-nodes"
    pcm = utterances_with_pauses(SENTENCES[:2], pause_ms=900, rate=8000)
    async with aiohttp.ClientSession() as http:
        on_a = asyncio.create_task(read_sse(http, f"{a.http}/api/calls/{call_id}/events"))
        on_b = asyncio.create_task(read_sse(http, f"{b.http}/api/calls/{call_id}/events"))
        await asyncio.sleep(0.3)
        await stream_call(a, call_id, pcm)
        stream_a, stream_b = await asyncio.wait_for(asyncio.gather(on_a, on_b), 30)

        kept = [(e.id, e.event, e.json()) for e in stream_a.events if e.event != "transcript.partial"]
        relayed = [(e.id, e.event, e.json()) for e in stream_b.events]
        assert [name for _, name, _ in kept] == ["call.started", "transcript.final", "transcript.final", "call.ended"]
        assert relayed == kept  # same events, same payloads, same ids
        assert all(p["text"] for _, name, p in kept if name == "transcript.final")

        # Resume on B after the first final, as a client whose connection to A dropped would.
        first_final = kept[1][0]
        resumed = await read_sse(http, f"{b.http}/api/calls/{call_id}/events", last_event_id=first_final)
        assert [(e.id, e.event) for e in resumed.events] == [(i, n) for i, n, _ in kept[2:]]
        # Everything seen: B answers 204, so EventSource stops reconnecting.
        done = await read_sse(http, f"{b.http}/api/calls/{call_id}/events", last_event_id=kept[-1][0])
        assert done.status == 204
    assert get_json(f"{b.http}/api/stats")["relay"]["relayed"] == len(kept)
    # A's client also subscribed before the call existed anywhere; A's own events came back over the
    # bus and were recognised by id, never shown twice.
    assert get_json(f"{a.http}/api/stats")["relay"]["relayed"] == 0
    assert get_json(f"{a.http}/api/stats")["streams_total"] == 1 and get_json(f"{b.http}/api/stats")[
        "streams_total"] == 0
