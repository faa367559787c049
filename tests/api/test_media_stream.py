"""The Telnyx WebSocket endpoint on the real server: bad input closes only its own stream."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
import websockets

from engine.codecs import get_codec
from tests.servers import API_KEY, MEDIA_TOKEN, Server, running_server
from tests.sse_client import read_sse

TOKEN = "stream-token-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("media"), SWITCHBOARD_STT_PROVIDER="null",
                        SWITCHBOARD_TELNYX_STREAM_TOKEN=TOKEN, SWITCHBOARD_MAX_MESSAGE_BYTES="8192") as srv:
        yield srv


def j(**fields: object) -> str:
    return orjson.dumps(fields).decode()


def start_msg(stream_id: str, call_id: str, encoding: str = "PCMU") -> str:
    return j(event="start", sequence_number="1", stream_id=stream_id, start={
        "call_control_id": call_id, "call_session_id": "sess",
        "media_format": {"encoding": encoding, "sample_rate": 8000, "channels": 1}})


def media_msg(stream_id: str, seq: int, payload: bytes) -> str:
    return j(event="media", sequence_number=str(seq), stream_id=stream_id,
             media={"track": "inbound", "chunk": str(seq), "timestamp": str(seq * 20),
                    "payload": base64.b64encode(payload).decode()})


SILENCE = get_codec("PCMU", 8000).encode(np.zeros(160, dtype="<i2").tobytes())


async def open_stream(server: Server, stream_id: str, call_id: str, token: str = TOKEN):  # type: ignore[no-untyped-def]
    ws = await websockets.connect(server.ws, additional_headers={"x-telnyx-streaming-auth-token": token})
    await ws.send(j(event="connected", version="1.0.0"))
    await ws.send(start_msg(stream_id, call_id))
    return ws


async def close_code_after(ws, *messages: str | bytes) -> tuple[int | None, str]:  # type: ignore[no-untyped-def]
    for m in messages:
        try:
            await ws.send(m)
        except websockets.ConnectionClosed:
            break
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    except websockets.ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason


BAD = {
    "malformed-json": (1007, ['{"event":"media",']),
    "unknown-event": (1003, [j(event="teleport", sequence_number="2")]),
    "bad-base64": (1007, [j(event="media", sequence_number="2", media={"payload": "%%%"})]),
    "not-whole-frames": (1007, ["PAYLOAD:100"]),
    "binary-frame": (1003, [b"\x00\x01\x02"]),
    "oversized": (1009, ["x" * 9000]),
}


async def test_each_bad_input_closes_its_stream_with_the_fitting_code_and_others_go_on(server: Server) -> None:
    good = await open_stream(server, "good-stream", "v3:good")
    sent = 0
    results: dict[str, tuple[int | None, str]] = {}
    for name, (_, messages) in BAD.items():
        ws = await open_stream(server, f"bad-{name}", f"v3:bad-{name}")
        msgs = [media_msg(f"bad-{name}", 2, b"\xff" * 100) if m == "PAYLOAD:100" else m for m in messages]
        results[name] = await close_code_after(ws, *msgs)
        for _ in range(5):  # the good stream keeps flowing while the others fail
            sent += 1
            await good.send(media_msg("good-stream", sent + 1, SILENCE))
    async with aiohttp.ClientSession() as http:
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/v3:good/events"))
        await good.send(j(event="stop", sequence_number=str(sent + 2), stream_id="good-stream", stop={}))
        await good.close()
        stream = await asyncio.wait_for(reader, 10)
    assert {name: code for name, (code, _) in results.items()} == {name: c for name, (c, _) in BAD.items()}
    assert all(reason for name, (_, reason) in results.items() if name != "oversized")
    ended = [e.json() for e in stream.events if e.event == "call.ended"]
    assert ended and ended[0]["stats"]["frames"] == sent
    assert (ended[0]["reason"], ended[0]["detail"], ended[0]["status"]) == ("stop", "stop", "completed")
    await asyncio.sleep(0.2)
    logged = {(rec.get("stream_id"), rec.get("close_code")) for rec in server.logs()
              if rec.get("event") in ("stream.protocol_error", "stream.ws_error")}
    for name, (code, _) in BAD.items():
        assert (f"bad-{name}", code) in logged, f"no log line with stream id and close code for {name}"


async def test_media_before_start_is_refused_with_1008(server: Server) -> None:
    ws = await websockets.connect(server.ws, additional_headers={"x-telnyx-streaming-auth-token": TOKEN})
    await ws.send(j(event="connected", version="1.0.0"))
    code, reason = await close_code_after(ws, media_msg("s", 2, SILENCE))
    assert code == 1008 and "not allowed" in reason


async def test_wrong_token_is_refused_with_1008_and_the_token_is_not_logged(server: Server) -> None:
    ws = await websockets.connect(server.ws, additional_headers={"x-telnyx-streaming-auth-token": "not-the-token"})
    # closed at once: the header token is looked up before the upgrade, and the field does not rescue it
    code, reason = await close_code_after(ws, j(event="connected", version="1.0.0",
                                                **{"x-telnyx-streaming-auth-token": TOKEN}), start_msg("w", "v3:w"))
    assert code == 1008 and "token" in reason
    await asyncio.sleep(0.1)
    text = server.log_path.read_text()
    assert TOKEN not in text and "not-the-token" not in text


async def test_token_in_connected_field_is_accepted(server: Server) -> None:
    ws = await websockets.connect(server.ws)
    await ws.send(j(event="connected", version="1.0.0", **{"x-telnyx-streaming-auth-token": TOKEN}))
    await ws.send(start_msg("field-token", "v3:field-token"))
    await ws.send(media_msg("field-token", 2, SILENCE))
    code, _ = await close_code_after(ws, j(event="stop", sequence_number="3", stream_id="field-token"))
    assert code == 1000


async def test_unsupported_encoding_is_refused_with_1003(server: Server) -> None:
    ws = await websockets.connect(server.ws, additional_headers={"x-telnyx-streaming-auth-token": TOKEN})
    code, reason = await close_code_after(ws, start_msg("opus", "v3:opus", encoding="OPUS"))
    assert code == 1003 and "OPUS" in reason


async def test_sse_subscriber_before_the_call_receives_its_events(server: Server, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/v3:early/events"))
        await asyncio.sleep(0.3)  # subscribed well before the stream exists
        ws = await open_stream(server, "early", "v3:early")
        for seq in range(2, 12):
            await ws.send(media_msg("early", seq, SILENCE))
        await close_code_after(ws, j(event="stop", sequence_number="12", stream_id="early"))
        stream = await asyncio.wait_for(reader, 10)
    assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
    assert [e.event for e in stream.events] == ["call.started", "call.ended"]
    assert [e.id for e in stream.events] == ["1", "2"]
    assert stream.retry is not None


@pytest.mark.parametrize("query", ["?language=fr", "?consumer_language=fr", "?language=en&translate_to=en",
                                   "?language=en&consumer_language=es&translate_to=en",
                                   "?language=en&consumer_language=es&translate_to=fr"])
async def test_languages_the_server_does_not_serve_or_a_contradictory_target_are_refused_before_the_upgrade(
        server: Server, query: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.ws + query, additional_headers={"x-telnyx-streaming-auth-token": TOKEN})
    assert refused.value.response.status_code == 400


@pytest.mark.parametrize("query, inbound", [("?language=en&consumer_language=es", "es"),
                                            ("?language=en&consumer_language=en", "en"), ("", "en")])
async def test_a_consumer_language_gives_the_inbound_track_its_own_leg(server: Server, query: str,
                                                                       inbound: str) -> None:
    call_id = f"v3:tracks-{inbound}-{len(query)}"
    async with aiohttp.ClientSession() as http:
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
        await asyncio.sleep(0.3)
        ws = await websockets.connect(server.ws + query, additional_headers={"x-telnyx-streaming-auth-token": TOKEN})
        await ws.send(j(event="connected", version="1.0.0"))
        await ws.send(start_msg("tracks", call_id))
        seq = 2
        for chunk in range(1, 11):
            for track in ("inbound", "outbound"):
                await ws.send(j(event="media", sequence_number=str(seq), stream_id="tracks", media={
                    "track": track, "chunk": str(chunk), "timestamp": str(chunk * 20),
                    "payload": base64.b64encode(SILENCE).decode()}))
                seq += 1
        await close_code_after(ws, j(event="stop", sequence_number=str(seq), stream_id="tracks"))
        stream = await asyncio.wait_for(reader, 10)
    started, ended = stream.events[0].json(), stream.events[-1].json()
    # No translator on this server: nothing is translated either way.
    assert started["tracks"] == {"inbound": {"language": inbound, "translate_to": None, "stt_provider": "null"},
                                 "outbound": {"language": "en", "translate_to": None, "stt_provider": "null"}}
    assert (started["language"], started["translate_to"]) == ("en", None)
    assert ended["stats"]["frames"] == 20  # both legs' frames, counted once each


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "receive-loop"])
async def test_both_delivery_paths_stream_a_call_and_refuse_bad_input(aiohttp_client, monkeypatch, inline) -> None:  # type: ignore[no-untyped-def]
    from api import inline_ws
    from api.app import build_app
    from api.settings import Settings

    monkeypatch.setattr(inline_ws, "ENABLED", inline)
    client = await aiohttp_client(await build_app(Settings(  # type: ignore[call-arg]
        stt_provider="null", persist=False, translation_provider="none", telnyx_stream_token=MEDIA_TOKEN,
        bootstrap_api_key=API_KEY)))
    ws = await client.ws_connect("/api/media/telnyx")  # the token in `connected`: held messages, then released
    await ws.send_str(j(event="connected", version="1.0.0", **{"x-telnyx-streaming-auth-token": MEDIA_TOKEN}))
    await ws.send_str(start_msg("p1", "v3:path"))
    for seq in range(2, 12):
        await ws.send_str(media_msg("p1", seq, SILENCE))
    await ws.send_str(j(event="stop", sequence_number="12", stream_id="p1"))
    await ws.receive()
    assert ws.close_code == 1000
    stream = await read_sse(client.session, str(client.make_url("/api/calls/v3:path/events")))
    assert stream.events[-1].json()["stats"]["frames"] == 10
    bad = await client.ws_connect("/api/media/telnyx", headers={"x-telnyx-streaming-auth-token": MEDIA_TOKEN})
    await bad.send_str(start_msg("p2", "v3:path2"))
    await bad.send_str('{"event":"media",')
    await bad.receive()
    assert bad.close_code == 1007
