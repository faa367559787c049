"""``switchboard bench latency``: how long an agent waits for a transcript, measured where the agent is.

N concurrent calls play real speech (espeak-ng sentences, 8 kHz G.711) in real time as Telnyx media
streams: ``connected``, ``start``, then one 20 ms ``media`` frame every 20 ms by the clock, then
``stop``.  For each call an SSE client listens as an agent's browser does.  Each call starts at a
random moment within its first second, so utterances do not end in step.

Per utterance (times on this machine's monotonic clock, which every process here shares)::

    figure              from                                   to
    final_ms            the frame carrying the utterance's     transcript.final at the agent (the
                        last voiced sample is sent              last final inside the utterance)
    partial_ms          the frame carrying its first voiced    its first transcript.partial
                        sample is sent
    translation_ms      transcript.final at the agent          translation.final of that final
    added_ms            the fake provider sends the final      transcript.final at the agent: the
                        (``--stt fake`` only)                   engine's own share (redaction, fan-
                                                               out, SSE); the goal is p99 < 10 ms

``final_ms`` includes the VAD's hangover (``VAD_HANGOVER_MS``: the segmenter waits that long after the
last voiced frame before it ends an utterance) and the recogniser's own time.  Per N: p50, p95, p99
and max of each, frames lost or late (the server's own count in each ``call.ended``), calls that did
not end cleanly, and the word error rate of the finals against the known text (with the fake
provider: against what it said, which checks that text arrives intact).

Two ways to run:
- ``--spawn`` (what ``make bench-latency`` does): starts ``switchboard serve --workers W`` on a free
  loopback port with storage on (embedded tiers in a temporary directory) and the recogniser named by
  ``--stt``: ``local`` (pocketsphinx with the sentences as its phrase list) or ``fake`` (a Deepgram
  live server in this process, ``tests/fakes/deepgram.py``, that answers each ``Finalize``
  ``--stt-delay-ms`` later with a unique final, so ``added_ms`` can be measured exactly).
- ``--url http://host:port`` against a running deployment (one node, several workers, or nginx in
  front), with ``--media-token`` and ``--api-key`` (default: the demo organisation's, as
  ``simulate-call``); its recogniser is whatever it is configured with.

Output: a progress bar on stderr, a table on stdout, ``--json`` (every utterance and the summaries)
and ``--plot`` (a PNG of each figure's distribution per N, matplotlib).  Run it from the repository:
it uses the test suite's speech fixtures and fake provider.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import uvloop
import websockets

from api.simulator import telnyx_messages
from bench.capacity import every_worker, stop

RATE = 8000
FRAME = RATE // 50  # samples per 20 ms
SENTENCES = [
    "please confirm your account number",
    "i would like to make a payment today",
    "can you call me back tomorrow morning",
    "i can pay two hundred dollars on friday",
]
PAUSE_MS = 1200  # between sentences: longer than any hangover, so every sentence is one utterance
VOICED = 0.02  # |sample| above this fraction of full scale counts as speech (trims espeak's soft edges)
END_TIMEOUT_S = 60.0  # after its last frame, a call must end (call.ended) within this
FAKE_FINAL_WORDS = "reference {n} confirmed"  # the fake provider's finals: unique, so each maps to its send


@dataclass
class Utterance:
    text: str
    first_voiced: int  # sample indexes in the call's audio
    last_voiced: int


@dataclass
class Plan:
    """One call's audio and what is said when."""

    pcm: np.ndarray
    utterances: list[Utterance]


def plan(sentences: list[str], rotate: int) -> Plan:
    """The sentences (rotated by ``rotate``) with pauses; each one's voiced span located in the audio."""
    from tests.speech import synthesize

    order = sentences[rotate % len(sentences):] + sentences[:rotate % len(sentences)]
    gap = np.zeros(RATE * PAUSE_MS // 1000, dtype=np.int16)
    parts, utterances, at = [gap], [], len(gap)
    for text in order:
        audio = synthesize(text, rate=RATE, pad_ms=0)
        voiced = np.flatnonzero(np.abs(audio.astype(np.int32)) > VOICED * 32767)
        utterances.append(Utterance(text, at + int(voiced[0]), at + int(voiced[-1])))
        parts += [audio, gap]
        at += len(audio) + len(gap)
    return Plan(np.concatenate(parts), utterances)


@dataclass
class CallResult:
    call_id: str
    n: int
    frames_sent: int = 0
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)  # (arrival, name, data)
    frame_times: np.ndarray | None = None  # monotonic send time of each media frame
    ended: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class UtteranceFigures:
    n: int
    call_id: str
    text: str
    heard: str
    final_ms: float | None
    partial_ms: float | None
    translation_ms: float | None
    added_ms: float | None


async def read_events(http: aiohttp.ClientSession, url: str, api_key: str, result: CallResult,
                      ready: asyncio.Event) -> None:
    """The call's SSE stream until ``call.ended``: (arrival time, event, data) into ``result``."""
    async with http.get(url, headers={"Authorization": f"Bearer {api_key}"},
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
        if resp.status != 200:
            result.error = f"SSE answered {resp.status}"
            ready.set()
            return
        ready.set()
        name, data = "", b""
        async for line in resp.content:
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data += line[5:].strip()
            elif not line and name:
                payload = orjson.loads(data) if data else {}
                result.events.append((time.monotonic(), name, payload))
                if name == "call.ended":
                    result.ended = payload
                    return
                name, data = "", b""


async def stream(ws_url: str, token: str, messages: list[str], result: CallResult) -> None:
    """Send the call as Telnyx does, each media frame at its time; record when each one left."""
    times = np.zeros(len(messages) - 3)
    async with websockets.connect(ws_url, additional_headers={"x-telnyx-streaming-auth-token": token},
                                  max_size=2**20, open_timeout=30) as ws:
        await ws.send(messages[0])
        await ws.send(messages[1])
        t0 = time.monotonic()
        for i, msg in enumerate(messages[2:-1]):
            delay = t0 + i * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(msg)
            times[i] = time.monotonic()
            result.frames_sent += 1
        await ws.send(messages[-1])
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    result.frame_times = times


async def one_call(n: int, base: str, token: str, api_key: str, call_id: str, messages: list[str],
                   http: aiohttp.ClientSession) -> CallResult:
    result = CallResult(call_id, n)
    await asyncio.sleep(random.random())  # calls start at random moments within the first second
    ready = asyncio.Event()
    reader = asyncio.create_task(read_events(http, f"{base}/api/calls/{call_id}/events", api_key, result, ready))
    await ready.wait()
    ws_url = base.replace("http", "ws", 1) + "/api/media/telnyx"
    try:
        await stream(ws_url, token, messages, result)
        await asyncio.wait_for(asyncio.shield(reader), END_TIMEOUT_S)
    except (OSError, TimeoutError, websockets.WebSocketException, aiohttp.ClientError) as exc:
        result.error = result.error or f"{type(exc).__name__}: {exc}"[:200]
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return result


def figures(result: CallResult, p: Plan, fake_sent: dict[str, float]) -> list[UtteranceFigures]:
    """Per utterance of one call: its finals and partials by stream time, translations by seq."""
    if result.frame_times is None or not result.frame_times.any():
        return []
    sent = result.frame_times

    def at(sample: int) -> float:  # when the frame carrying ``sample`` was sent
        return float(sent[min(sample // FRAME, len(sent) - 1)])

    finals = [(t, d) for t, name, d in result.events if name == "transcript.final" and d.get("track") == "inbound"]
    partials = [(t, d) for t, name, d in result.events if name == "transcript.partial"
                and d.get("track") == "inbound"]
    translations = {d.get("seq"): t for t, name, d in result.events if name == "translation.final"}
    out = []
    for u in p.utterances:
        lo, hi = u.first_voiced * 1000 // RATE, u.last_voiced * 1000 // RATE

        def inside(d: dict[str, Any], lo: int = lo, hi: int = hi) -> bool:
            mid = (d.get("start", 0) + d.get("end", 0)) / 2  # ms of stream time
            return lo - 400 <= mid <= hi + 400

        mine = [(t, d) for t, d in finals if inside(d)]
        last = max(mine, key=lambda x: x[0]) if mine else None
        first_partial = min((t for t, d in partials if inside(d)), default=None)
        heard = " ".join(d.get("text", "") for _, d in mine)
        out.append(UtteranceFigures(
            result.n, result.call_id, u.text, heard,
            final_ms=(last[0] - at(u.last_voiced)) * 1000 if last else None,
            partial_ms=(first_partial - at(u.first_voiced)) * 1000 if first_partial is not None else None,
            translation_ms=((translations[last[1].get("seq")] - last[0]) * 1000
                            if last and last[1].get("seq") in translations else None),
            added_ms=((last[0] - fake_sent[heard]) * 1000 if last and heard in fake_sent else None),
        ))
    return out


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.array(values)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 1),
            "p95": round(float(np.percentile(a, 95)), 1), "p99": round(float(np.percentile(a, 99)), 1),
            "max": round(float(a.max()), 1)}


def progress(done: int, total: int, started: float, label: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} calls "
                     f"{time.monotonic() - started:5.1f} s")
    sys.stderr.flush()


async def run_level(n: int, base: str, token: str, api_key: str, plans: list[Plan],
                    fake_sent: dict[str, float], references: dict[str, str]) -> dict[str, Any]:
    from tests.speech import word_error_rate

    # Every call's messages are built before any call starts: building them costs this process tens of
    # milliseconds a call, which would otherwise land in the middle of other calls' measurements.
    calls = []
    for i in range(n):
        call_id = f"v3:bench-{uuid.uuid4()}"
        calls.append((call_id, telnyx_messages(plans[i % len(plans)].pcm, call_id=call_id, stream_id=str(uuid.uuid4()),
                                               encoding="PCMU", sample_rate=RATE, token=None)))
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [asyncio.create_task(one_call(n, base, token, api_key, call_id, messages, http))
                 for call_id, messages in calls]
        done = 0
        ticker = asyncio.create_task(_tick(lambda: done, n, started, f"N={n:<4}"))
        results = []
        for fut in asyncio.as_completed(tasks):
            results.append(await fut)
            done += 1
        ticker.cancel()
        progress(done, n, started, f"N={n:<4}")
        sys.stderr.write("\n")
    by_id = {r.call_id: r for r in results}
    rows: list[UtteranceFigures] = []
    for i, task in enumerate(tasks):
        r = by_id[task.result().call_id]
        rows += figures(r, plans[i % len(plans)], fake_sent)
    reference = " ".join(references.get(u.heard, u.text) for u in rows)
    hypothesis = " ".join(u.heard for u in rows)
    lost = sum(int((r.ended or {}).get("stats", {}).get("lost_frames", 0)) for r in results)
    late = sum(int((r.ended or {}).get("stats", {}).get("late_frames", 0)) for r in results)
    return {
        "calls": n, "utterances": len(rows),
        "final_ms": percentiles([u.final_ms for u in rows if u.final_ms is not None]),
        "partial_ms": percentiles([u.partial_ms for u in rows if u.partial_ms is not None]),
        "translation_ms": percentiles([u.translation_ms for u in rows if u.translation_ms is not None]),
        "added_ms": percentiles([u.added_ms for u in rows if u.added_ms is not None]),
        "missing_finals": sum(1 for u in rows if u.final_ms is None),
        "frames_sent": sum(r.frames_sent for r in results), "frames_lost": lost, "frames_late": late,
        "calls_failed": [{"call_id": r.call_id, "error": r.error, "reason": (r.ended or {}).get("reason")}
                         for r in results if r.error or (r.ended or {}).get("status") != "completed"],
        "wer": round(word_error_rate(reference, hypothesis), 3) if rows else None,
        "rows": [asdict(u) for u in rows],
    }


async def _tick(done: Any, total: int, started: float, label: str) -> None:
    while True:
        progress(done(), total, started, label)
        await asyncio.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def spawned(workers: int, stt: str, deepgram_url: str | None, tmp: Path) -> Iterator[tuple[str, str, str]]:
    """``switchboard serve`` on a free loopback port, storage on (embedded tiers under ``tmp``)."""
    port = free_port()
    token, api_key = "sbm_bench_" + uuid.uuid4().hex, "sbk_bench_" + uuid.uuid4().hex
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    env = {**os.environ, "SWITCHBOARD_DATA_DIR": str(tmp / "data"), "SWITCHBOARD_LOG_LEVEL": "WARNING",
           "SWITCHBOARD_TELNYX_STREAM_TOKEN": token, "SWITCHBOARD_BOOTSTRAP_API_KEY": api_key,
           "SWITCHBOARD_WORKERS": str(workers), "SWITCHBOARD_TRANSLATION_PROVIDER":
               "apertium" if shutil.which("apertium") else "none"}
    if stt == "local":
        env.update(SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases))
    else:
        env.update(SWITCHBOARD_STT_PROVIDER="deepgram", DEEPGRAM_API_KEY="bench-key",
                   SWITCHBOARD_DEEPGRAM_URL=str(deepgram_url))
    log = open(tmp / "server.log", "wb")  # closed below, after the process
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:  # every worker answers (each names itself), not just the first one listening
                every_worker(f"{base}/api/stats", workers=workers, token=api_key)
                break
            except (OSError, RuntimeError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {tmp / 'server.log'}")
            time.sleep(0.2)
        yield base, token, api_key
    finally:
        stop(proc, 60)
        log.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any] | None:
    levels = [int(x) for x in args.calls.split(",")]
    plans = [plan(SENTENCES, i) for i in range(len(SENTENCES))]
    fake_sent: dict[str, float] = {}
    references: dict[str, str] = {}  # fake mode: what the fake said -> itself (WER checks delivery)
    fake = None
    if args.stt == "fake":
        from tests.fakes.deepgram import FakeDeepgram

        counter = itertools.count()

        def final_text() -> str:
            return FAKE_FINAL_WORDS.format(n=next(counter))

        def on_final(text: str) -> None:
            fake_sent[text] = time.monotonic()
            references[text] = text

        fake = FakeDeepgram(["one moment please"] * 100_000, api_key="bench-key", word_ms=200,
                            segment_words=1000, idle_timeout=60.0, final_delay_s=args.stt_delay_ms / 1000,
                            final_text=final_text, on_final=on_final)
        await fake.start()
    tmp = Path(tempfile.mkdtemp(prefix="switchboard-latency-"))
    out: dict[str, Any] = {"stt": args.stt, "stt_delay_ms": args.stt_delay_ms if fake else None,
                           "workers": args.workers, "levels": []}
    try:
        with contextlib.ExitStack() as stack:
            if args.url:
                base, token, api_key = args.url.rstrip("/"), args.media_token, args.api_key
                if token is None or api_key is None:
                    from api.bootstrap import read_demo
                    from api.settings import Settings

                    demo = read_demo(Settings())
                    if demo is None:
                        print("give --media-token and --api-key (no demo organisation here)", file=sys.stderr)
                        return None
                    token, api_key = token or demo.media_token, api_key or demo.api_key
            else:
                url = fake.url if fake else None
                base, token, api_key = await asyncio.to_thread(
                    stack.enter_context, spawned(args.workers, args.stt, url, tmp))
            for n in levels:
                level = await run_level(n, base, token, api_key, plans, fake_sent, references)
                out["levels"].append(level)
                print(_row(level), flush=True)
    finally:
        if fake is not None:
            await fake.stop()
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return out


def _fmt(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "-"
    return f"{p['p50']:.0f}/{p['p95']:.0f}/{p['p99']:.0f}/{p['max']:.0f}"


def _row(level: dict[str, Any]) -> str:
    return (f"N={level['calls']:<4} utterances={level['utterances']:<4} "
            f"final p50/p95/p99/max ms {_fmt(level['final_ms'])}  partial {_fmt(level['partial_ms'])}  "
            f"translation {_fmt(level['translation_ms'])}  added {_fmt(level['added_ms'])}  "
            f"missing finals {level['missing_finals']}  frames lost {level['frames_lost']} "
            f"late {level['frames_late']} of {level['frames_sent']}  failed calls {len(level['calls_failed'])}  "
            f"WER {level['wer']}")


def plot(out: dict[str, Any], path: Path) -> None:
    """One panel per figure: each N's distribution as an empirical CDF (ms on a log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in ("final_ms", "partial_ms", "translation_ms", "added_ms")
             if any(lv[k]["n"] for lv in out["levels"])]
    cols = 2 if len(names) > 1 else 1
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        everything = []
        for lv in out["levels"]:
            values = np.sort([r[name] for r in lv["rows"] if r[name] is not None])
            everything += list(values)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=f"N={lv['calls']}")
        positive = [v for v in everything if v > 0]
        if positive and max(positive) / min(positive) > 30:  # a wide spread reads better on a log axis
            ax.set_xscale("log")
        ax.set_xlabel(f"{name.removesuffix('_ms')} (ms)")
        ax.set_ylabel("fraction of utterances")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    delay = f", provider delay {out['stt_delay_ms']} ms" if out["stt_delay_ms"] is not None else ""
    fig.suptitle(f"Switchboard latency: {out['stt']} recogniser, {out['workers']} worker(s){delay}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="switchboard bench latency",
                                               description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--calls", default="1,10,50", help="concurrent calls per level, comma-separated")
    parser.add_argument("--url", default=None, help="a running deployment (default: spawn one)")
    parser.add_argument("--media-token", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--stt", choices=["local", "fake"], default="local",
                        help="with the spawned server: pocketsphinx, or a fake Deepgram answering with a delay")
    parser.add_argument("--stt-delay-ms", type=int, default=300, help="the fake provider's time to final")
    parser.add_argument("--workers", type=int, default=1, help="the spawned server's worker processes")
    parser.add_argument("--json", default=None, help="write every utterance's figures and the summaries here")
    parser.add_argument("--plot", default=None, help="write a PNG of the distributions here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "tests" / "speech.py").exists() and str(repo) not in sys.path:
        sys.path.insert(0, str(repo))  # the test suite's speech fixtures and fake provider (see above)
    if args.url is None and args.stt == "local" and shutil.which("espeak-ng") is None:
        print("espeak-ng is needed for the speech (make bench installs it)", file=sys.stderr)
    out = uvloop.run(main_async(args))  # the harness's own loop adds as little as it can to what it measures
    if out is None:
        return 2
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    if args.plot:
        plot(out, Path(args.plot))
    return 0 if all(not lv["calls_failed"] and not lv["missing_finals"] for lv in out["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
