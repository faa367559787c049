"""``GET /metrics``: Prometheus exposition of a real server after a real call.

Real speech streams through the local recogniser; the scrape must then say how many streams,
utterances and finals there were, how long each final took after its utterance ended, and how late
the frames came, and must be parseable by Prometheus' own parser.  Only the metrics token or an admin
may read it.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import API_KEY, METRICS_TOKEN, Server, running_server
from tests.speech import utterances_with_pauses
from tests.sse_client import read_sse
from tests.test_end_to_end import SENTENCES, stream_call


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("metrics")
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    with running_server(tmp, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_STT_MAX_DECODERS="1") as s:
        yield s


def scrape(server: Server, token: str | None = METRICS_TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    req = urllib.request.Request(f"{server.http}/metrics",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef0123", "sbk_not_a_real_key_0123456789"])
def test_metrics_need_the_metrics_credential(server: Server, token: str | None) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(server, token)
    assert err.value.code == 401


async def test_a_call_shows_in_the_metrics(server: Server, tmp_path: Path) -> None:
    before = scrape(server, API_KEY)  # an admin may read them too
    assert value(before, "switchboard_streams_active") == 0
    pcm = utterances_with_pauses(SENTENCES[:2], pause_ms=900, rate=8000)
    call_id = "v3:metrics"
    async with aiohttp.ClientSession() as http:
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
        await asyncio.sleep(0.2)
        await stream_call(server, call_id, pcm)
        stream = await asyncio.wait_for(reader, 60)
    finals = sum(1 for e in stream.events if e.event == "transcript.final")
    partials = sum(1 for e in stream.events if e.event == "transcript.partial")
    assert finals == 2

    after = scrape(server)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    assert value(delta, "switchboard_streams_total") == 1
    assert value(after, "switchboard_streams_active") == 0
    assert value(delta, "switchboard_utterances_total") == 2
    assert value(delta, "switchboard_transcripts_total", kind="final") == finals
    assert value(delta, "switchboard_transcripts_total", kind="partial") >= partials  # SSE coalesces partials
    frames = value(delta, "switchboard_frames_total")
    assert abs(frames - len(pcm) / 160) <= 2, frames  # every 20 ms frame of the call, once
    # Each final was timed from its utterance's end, under the recogniser's name.
    assert value(after, "switchboard_stt_time_to_final_seconds_count", provider="pocketsphinx") == finals
    ttf_sum = value(after, "switchboard_stt_time_to_final_seconds_sum", provider="pocketsphinx")
    assert 0 < ttf_sum / finals < 5
    inf = value(after, "switchboard_stt_time_to_final_seconds_bucket", provider="pocketsphinx", le="+Inf")
    assert inf == finals
    # Inbound frames, 1 in 4 sampled for lag; on loopback nearly all within 20 ms.
    lag_count = value(delta, "switchboard_frame_lag_seconds_count")
    assert lag_count >= frames // 4 - 2
    assert value(delta, "switchboard_frame_lag_seconds_bucket", le="0.02") >= 0.9 * lag_count
    assert value(delta, "switchboard_stage_dropped_total", stage="stt") == 0
    assert value(after, "switchboard_frames_lost_total", why="lost") == 0
    assert value(after, "process_resident_memory_bytes") > 0
