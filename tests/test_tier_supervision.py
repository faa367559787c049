"""Embedded Valkey, then embedded PostgreSQL, killed (SIGKILL) in the middle of a live call.

The server runs with its embedded tiers (as `make run` does).  A call of three spoken sentences
streams in real time with an SSE client watching it.  When the first final transcript arrives,
Valkey is killed; when the second arrives, the postmaster.  Each time /readyz must answer 503 naming
that tier (and only that tier), then 200 once the supervisor has restarted it.  The call itself
never notices: every final reaches SSE and is stored in PostgreSQL, the call ends ``completed`` with
its recording, and nothing was dropped on the way (writer, bus).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from tests.servers import Server, get_json, running_server
from tests.speech import utterances_with_pauses
from tests.sse_client import SseEvent, read_sse
from tests.test_crash_recovery import postgres_socket
from tests.test_end_to_end import SENTENCES, stream_call


async def readyz(http: aiohttp.ClientSession, server: Server) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{server.http}/readyz") as resp:
        return resp.status, await resp.json()


async def outage(http: aiohttp.ClientSession, server: Server, tier: str, pid: int) -> dict[str, Any]:
    """Kill ``pid`` and watch /readyz: 503 naming ``tier`` alone, then 200.  Returns what was seen."""
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    seen_down: dict[str, Any] | None = None
    while time.monotonic() - t0 < 15:
        status, body = await readyz(http, server)
        if status == 503 and seen_down is None:
            seen_down = body
        elif status == 200 and seen_down is not None:
            return {"tier": tier, "down": seen_down, "up_after_s": time.monotonic() - t0, "up": body}
        await asyncio.sleep(0.02)
    raise AssertionError(f"{tier}: /readyz never went 503 then 200 (down seen: {seen_down})")


async def test_killed_valkey_and_postgres_are_restarted_while_a_live_call_loses_nothing(tmp_path: Path) -> None:
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    data = (tmp_path / "data").resolve()
    # No readiness cache: the test looks for the short window while a tier is down.
    with running_server(tmp_path, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_PERSIST="true", SWITCHBOARD_READINESS_CACHE_S="0") as server:
        call_id = "v3:tier-outage"
        pcm = utterances_with_pauses(SENTENCES, pause_ms=1500, rate=8000)
        outages: list[asyncio.Task[dict[str, Any]]] = []
        async with aiohttp.ClientSession() as http:
            assert (await readyz(http, server))[0] == 200

            async def second_after_first() -> dict[str, Any]:
                await outages[0]
                postmaster = int((data / "postgres" / "postmaster.pid").read_text().split()[0])
                return await outage(http, server, "postgres", postmaster)

            def on_event(ev: SseEvent) -> None:
                if ev.event != "transcript.final":
                    return
                if not outages:
                    valkey = int((data / "valkey" / "valkey.pid").read_text())
                    outages.append(asyncio.create_task(outage(http, server, "redis", valkey)))
                elif len(outages) == 1:
                    outages.append(asyncio.create_task(second_after_first()))

            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events",
                                                  on_event=on_event))
            await asyncio.sleep(0.2)
            await stream_call(server, call_id, pcm)
            stream = await asyncio.wait_for(reader, 60)
            seen = await asyncio.gather(*outages)

        for o in seen:
            tiers = o["down"]["tiers"]
            assert o["down"]["status"] == "degraded" and not tiers[o["tier"]]["ok"], o
            others_down = {name: t for name, t in tiers.items() if name != o["tier"] and not t["ok"]}
            assert others_down == {}, (o["tier"], others_down)  # names the tier, should this ever fail
            assert o["up"]["tiers"][o["tier"]]["detail"].startswith("embedded server running (restarted 1x)"), o
            print(f"\n{o['tier']}: /readyz 503 ({tiers[o['tier']]['detail']}), 200 again {o['up_after_s']:.2f}s "
                  "after the kill")
        assert [o["tier"] for o in seen] == ["redis", "postgres"]

        finals = [e.json() for e in stream.events if e.event == "transcript.final"]
        ended = stream.events[-1]
        assert len(finals) == len(SENTENCES) and ended.event == "call.ended"
        assert ended.json()["stats"]["finals"] == len(SENTENCES) and ended.json()["stats"]["stt_dropped"] == 0

        conn = await asyncpg.connect(f"postgresql://postgres@/switchboard?host={postgres_socket(data)}")
        try:
            for _ in range(150):  # the writer retries with backoff (at most 2 s apart)
                call = await conn.fetchrow("SELECT * FROM calls WHERE call_control_id = $1", call_id)
                stored = await conn.fetch("SELECT seq, text FROM transcriptions ORDER BY seq")
                recording = await conn.fetchval("SELECT count(*) FROM recordings")
                if call is not None and call["status"] == "completed" and len(stored) == 3 and recording == 1:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert call is not None and call["status"] == "completed"
        assert [(r["seq"], r["text"]) for r in stored] == [(f["seq"], f["text"]) for f in finals]
        assert recording == 1
        stats = get_json(f"{server.http}/api/stats")
        p, bus = stats["persistence"], stats["bus"]
        assert p["writer_dropped"] == 0 and p["writer_rejected"] == 0 and p["writer_pending"] == 0, p
        assert p["recordings_stored"] == 1 and p["recordings_failed"] == 0, p
        assert bus["dropped"] == 0 and bus["forwarded"] == 2 + len(SENTENCES), bus  # started, finals, ended
        events = [line.get("event") for line in server.logs()]
        assert events.count("tier.down") == 2 and events.count("tier.restarted") == 2
