"""Capacity benchmark: how many Telnyx media streams one core carries through the full path.

    python -m bench.capacity [--streams 600,900,1200] [--seconds 15] [--baseline]

The server (``switchboard serve`` with the no-op ``null`` recogniser, so decode, VAD, segmentation,
STT fan-out and SSE publish all run) is pinned to core 0; this process, the load generator, to
core 1.  For each N it opens N WebSockets that speak the Telnyx protocol (connected, start, then
mu-law 8 kHz speech with pauses in 20 ms ``media`` messages, streams staggered across the 20 ms
period as independent calls are), warms up, then measures for ``--seconds``:

* p99 frame lag: server-side, how late each frame finished processing relative to its audio clock
  (``/api/stats``, see ``api.call_session.CallSession._lag_ms``);
* backlog: frames sent minus frames the server processed, at the start and end of the window
  (growing = the server is falling behind);
* server CPU (share of its core) and RSS, per stream.

A run passes when p99 lag < 20 ms, the backlog does not grow (by more than one frame per stream)
and the generator itself kept its schedule; with ``--repeat R``, N passes when most of its R runs
do (this shared machine's speed varies from run to run by about 10 %).
``--baseline`` runs the same load against a bare aiohttp receive-and-discard server
(``bench.bare_server``) to print Switchboard's cost per frame as a ratio of it.  ``--workers N``
(``switchboard bench capacity --workers N``) starts ``serve --workers N`` unpinned: CPU and RSS are
summed over its workers, frames summed and the frame lag the worst worker's; the generator then
shares the cores with them (on a 2-core machine it falls behind: see README).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import uvloop

from engine.codecs import get_codec

PERSIST = False  # --persist: the server runs with its storage tiers
WORKERS = 1  # --workers: the server's processes (1: pinned to core 0, the per-core figure)
# The credentials the benchmark's server is started with (api.auth): streams present the media token,
# /api/stats is read with the metrics token.
MEDIA_TOKEN = "sbm_bench_media_token_0123456789abcdef"
METRICS_TOKEN = "bench-metrics-token-0123456789abcdef"

FRAME_S = 0.02
GROUPS = 10  # staggered send slots within each 20 ms period
TEXTS = [
    "hello, thank you for calling, how can I help you today",
    "I would like to make a payment on my account",
    "can you confirm the amount and the due date please",
    "thank you, have a nice day",
]


def speech_payloads(tmp: Path) -> list[str]:
    """Base64 mu-law payloads, 20 ms each, of espeak-ng speech separated by 1 s pauses."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is required (apt-get install espeak-ng)")
    parts = []
    for i, text in enumerate(TEXTS):
        wav = tmp / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True)
        data, rate = soundfile.read(wav, dtype="float64")
        n_out = int(len(data) * 8000 / rate)
        spec = np.fft.rfft(data)[: n_out // 2 + 1]
        parts.append(np.fft.irfft(spec, n_out) * n_out / len(data))
        parts.append(np.zeros(8000))
    pcm = np.clip(np.concatenate(parts) * 32767, -32768, 32767).astype("<i2")
    pcm = pcm[: len(pcm) // 160 * 160]
    codec = get_codec("PCMU", 8000)
    return [base64.b64encode(codec.encode(pcm[i : i + 160].tobytes())).decode() for i in range(0, len(pcm), 160)]


def ws_frame(payload: bytes) -> bytes:
    """A masked client text frame; the zero mask key leaves the payload as is (RFC 6455 allows it)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + b"\x00\x00\x00\x00" + payload


class Stream(asyncio.Protocol):
    """One Telnyx-speaking connection; reads and ignores what the server sends."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sid = f"bench-{index}".encode()
        self.transport: asyncio.Transport | None = None
        self.upgraded = asyncio.get_running_loop().create_future()
        self.seq = 1
        self.closed = False
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            self._buf += data
            if b"\r\n\r\n" in self._buf:
                ok = self._buf.startswith(b"HTTP/1.1 101")
                self.upgraded.set_result(ok) if ok else self.upgraded.set_exception(
                    RuntimeError(self._buf.split(b"\r\n", 1)[0].decode()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed during upgrade"))

    def send(self, message: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(ws_frame(message))


async def open_stream(port: int, index: int) -> Stream:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Stream(index), "127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    proto.transport.write((  # type: ignore[union-attr]
        f"GET /api/media/telnyx HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"x-telnyx-streaming-auth-token: {MEDIA_TOKEN}\r\n\r\n").encode())
    await asyncio.wait_for(proto.upgraded, 30)
    proto.send(b'{"event":"connected","version":"1.0.0"}')
    proto.send(json.dumps({"event": "start", "sequence_number": "1", "stream_id": proto.sid.decode(), "start": {
        "call_control_id": f"v3:bench-{index}", "call_session_id": "bench",
        "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}).encode())
    return proto


@dataclass
class Load:
    streams: list[Stream]
    payloads: list[bytes]
    sent: int = 0
    late_ticks: int = 0
    ticks: int = 0
    running: bool = True
    lateness_ms: list[float] = field(default_factory=list)  # per tick, bounded by the run's length

    async def run_group(self, group: int, t0: float) -> None:
        loop = asyncio.get_running_loop()
        mine = self.streams[group::GROUPS]
        tick = 0
        while self.running:
            due = t0 + tick * FRAME_S + group * FRAME_S / GROUPS
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = loop.time() - due  # measured after the sleep: oversleeping is lateness too
            if late > FRAME_S:
                self.late_ticks += 1
            self.lateness_ms.append(max(0.0, late) * 1000)
            self.ticks += 1
            for s in mine:
                payload = self.payloads[(s.seq + s.index) % len(self.payloads)]
                s.seq += 1
                ts = (s.seq - 2) * 20
                s.send(b'{"event":"media","sequence_number":"%d","stream_id":"%s","media":{"track":"inbound",'
                       b'"chunk":"%d","timestamp":"%d","payload":"%s"}}' % (s.seq, s.sid, s.seq - 1, ts, payload))
                self.sent += 1
            tick += 1


def get_json(url: str, method: str = "GET", token: str = METRICS_TOKEN) -> dict:  # type: ignore[type-arg]
    # The server takes POSTs only as JSON (415 otherwise: api/middleware.py).
    req = urllib.request.Request(url, method=method, headers={"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


async def fetch(url: str, method: str = "GET") -> dict:  # type: ignore[type-arg]
    return await asyncio.get_running_loop().run_in_executor(None, get_json, url, method)


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of ``pid`` and, with ``serve --workers``, of its worker processes."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    cpu, rss = 0.0, 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def every_worker(url: str, method: str = "GET", *, workers: int | None = None,
                 token: str = METRICS_TOKEN) -> list[dict]:  # type: ignore[type-arg]
    """``url`` answered by each worker of the server once: each new connection lands on a worker the
    kernel picks, so ask until every one of ``workers`` (default ``WORKERS``) has answered (bounded)."""
    workers = workers or WORKERS
    seen: dict[int, dict] = {}  # type: ignore[type-arg]
    for _ in range(200 * workers):
        reply = get_json(url, method, token)
        seen.setdefault(reply.get("node", {}).get("pid", 0), reply)
        if len(seen) >= workers:
            return list(seen.values())
    raise RuntimeError(f"only {len(seen)} of {workers} workers answered")


def stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def fetch_all(url: str, method: str = "GET") -> dict:  # type: ignore[type-arg]
    """/api/stats of the whole server: frames summed over the workers, frame lag the worst worker's."""
    if WORKERS == 1:
        return await fetch(url, method)
    replies = await asyncio.get_running_loop().run_in_executor(None, every_worker, url, method)
    if method != "GET":
        return {}
    return {"frames": sum(r["frames"] for r in replies),
            "frame_lag": {k: max(r["frame_lag"][k] for r in replies) for k in ("p99_ms", "max_ms")}}


async def measure(port: int, pid: int, n: int, payloads: list[bytes], seconds: float, warmup: float) -> dict:  # type: ignore[type-arg]
    base = f"http://127.0.0.1:{port}"
    _, rss0 = proc_stat(pid)
    streams = []
    for start in range(0, n, 50):  # connect in batches, as calls arrive
        streams += await asyncio.gather(*(open_stream(port, i) for i in range(start, min(n, start + 50))))
    load = Load(streams, payloads)
    t0 = asyncio.get_running_loop().time() + 0.05
    tasks = [asyncio.create_task(load.run_group(g, t0)) for g in range(GROUPS)]
    try:
        await asyncio.sleep(warmup)
        await fetch_all(f"{base}/api/stats/reset", "POST")
        s0, sent0, (cpu0, _), w0 = await fetch_all(f"{base}/api/stats"), load.sent, proc_stat(pid), time.monotonic()
        late0, ticks0 = load.late_ticks, load.ticks
        lateness_from = len(load.lateness_ms)
        await asyncio.sleep(seconds)
        s1, sent1, (cpu1, rss1), w1 = await fetch_all(f"{base}/api/stats"), load.sent, proc_stat(pid), time.monotonic()
        late1, ticks1 = load.late_ticks, load.ticks
    finally:
        load.running = False
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            s.send(b'{"event":"stop","sequence_number":"%d","stream_id":"%s"}' % (s.seq + 1, s.sid))
        await asyncio.sleep(1.0)
        for s in streams:
            if s.transport is not None:
                s.transport.close()
    backlog0, backlog1 = sent0 - s0["frames"], sent1 - s1["frames"]
    wall = w1 - w0
    dead = sum(s.closed for s in streams)
    return {
        "streams": n,
        "p99_lag_ms": s1["frame_lag"]["p99_ms"],
        "max_lag_ms": s1["frame_lag"].get("max_ms", 0.0),
        "backlog_start": backlog0,
        "backlog_end": backlog1,
        "cpu_share": (cpu1 - cpu0) / wall,
        "cpu_us_per_frame": (cpu1 - cpu0) / max(1, s1["frames"] - s0["frames"]) * 1e6,
        "rss_mb": rss1 / 2**20,
        "rss_kb_per_stream": (rss1 - rss0) / 1024 / n,
        "generator_late_ticks": (late1 - late0) / max(1, ticks1 - ticks0),
        "generator_p99_late_ms": float(np.percentile(load.lateness_ms[lateness_from:] or [0.0], 99)),
        "frames_per_s": (s1["frames"] - s0["frames"]) / wall,
        "closed_by_server": dead,
    }


def passed(r: dict, baseline: bool) -> bool:  # type: ignore[type-arg]
    lag_ok = baseline or r["p99_lag_ms"] < 20
    return (lag_ok and r["backlog_end"] - r["backlog_start"] <= r["streams"] and r["closed_by_server"] == 0
            and r["generator_late_ticks"] < 0.01)


@contextlib.contextmanager
def server(baseline: bool, port: int):  # type: ignore[no-untyped-def]
    cmd = [sys.executable, "-m", "bench.bare_server", "--port", str(port)] if baseline else [
        sys.executable, "-m", "api.cli", "serve", "--port", str(port)]
    env = {**os.environ, "SWITCHBOARD_STT_PROVIDER": "null", "SWITCHBOARD_MAX_STREAMS": "100000",
           "SWITCHBOARD_LOG_LEVEL": "WARNING", "SWITCHBOARD_TRANSLATION_PROVIDER": "none",
           "SWITCHBOARD_PERSIST": "true" if PERSIST else "false",
           "SWITCHBOARD_TELNYX_STREAM_TOKEN": MEDIA_TOKEN, "SWITCHBOARD_METRICS_TOKEN": METRICS_TOKEN,
           "SWITCHBOARD_WORKERS": str(WORKERS),
           "SWITCHBOARD_DATA_DIR": tempfile.mkdtemp(prefix="switchboard-bench-")}  # fresh tiers per run
    # One process: pinned to core 0 (the generator takes core 1).  Several: on every core, beside the
    # generator, which then competes with them (say so when reading the figures).
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") and (baseline or WORKERS == 1) else []
    proc = subprocess.Popen(taskset + cmd, env=env)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError, RuntimeError):
                if WORKERS > 1 and not baseline:
                    every_worker(f"http://127.0.0.1:{port}/api/stats")  # every worker listens
                else:
                    get_json(f"http://127.0.0.1:{port}/api/stats")
                break
            time.sleep(0.1)
        yield proc.pid
    finally:
        stop(proc, 10)


async def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {1})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        payloads = [p.encode() for p in speech_payloads(Path(tmp))]
    counts = [int(x) for x in args.streams.split(",")]
    results = {}
    servers = [("switchboard", False)] if not args.baseline_only else []
    servers += [("bare-aiohttp", True)] if args.baseline or args.baseline_only else []
    for label, baseline in servers:
        rows = []
        passing = []
        for n in counts:
            votes = 0
            for attempt in range(args.repeat):
                port = 20000 + n % 1000 + (500 if baseline else 0) + 100 * attempt
                with server(baseline, port) as pid:
                    r = await measure(port, pid, n, payloads, args.seconds, args.warmup)
                r["pass"] = passed(r, baseline)
                votes += r["pass"]
                rows.append(r)
            print(f"{label:13} N={n:5} p99_lag={r['p99_lag_ms']:6.1f}ms max={r['max_lag_ms']:7.1f}ms "
                  f"backlog {r['backlog_start']:6}->{r['backlog_end']:6} cpu={r['cpu_share']*100:5.1f}% "
                  f"{r['cpu_us_per_frame']:5.1f}us/frame rss={r['rss_mb']:6.1f}MB "
                  f"({r['rss_kb_per_stream']:5.1f}KB/stream) gen_late={r['generator_late_ticks']:.3f} "
                  f"gen_p99={r['generator_p99_late_ms']:.1f}ms "
                  f"{'PASS' if r['pass'] else 'FAIL'}", flush=True)
            if votes * 2 > args.repeat:
                passing.append(n)
            print(f"{label:13} N={n:5} passed {votes} of {args.repeat} runs", flush=True)
        best = max(passing, default=0)
        results[label] = {"rows": rows, "max_streams": best}
        print(f"{label}: largest passing N = {best} streams on one core", flush=True)
    sb = results.get("switchboard", {}).get("max_streams", 0)
    print(f"target 900 streams/core: ratio {sb / 900:.2f}")
    if "bare-aiohttp" in results and "switchboard" in results:
        # The bare server passes every N tried here, so compare CPU cost per frame instead.
        def cost(label: str) -> float:
            rows = results[label]["rows"]
            return sum(r["cpu_us_per_frame"] for r in rows) / len(rows)

        ratio = cost("switchboard") / cost("bare-aiohttp")
        print(f"CPU per frame: switchboard {cost('switchboard'):.1f} us, bare aiohttp {cost('bare-aiohttp'):.1f} us "
              f"(x{ratio:.2f}); one core saturates at {1e6 / 50 / cost('switchboard'):.0f} vs "
              f"{1e6 / 50 / cost('bare-aiohttp'):.0f} streams")
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230 - one small write after the run
            json.dump(results, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="switchboard bench capacity",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--streams", default="300,600,900,1200,1500")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per N; N passes on a majority")
    parser.add_argument("--baseline", action="store_true", help="also measure a bare aiohttp server")
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--persist", action="store_true",
                        help="storage tiers on (embedded PostgreSQL, Valkey, local recordings)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (serve --workers); 1 is pinned to core 0, more share every core")
    args = parser.parse_args(argv)
    global PERSIST, WORKERS
    PERSIST = args.persist
    WORKERS = args.workers
    sys.exit(uvloop.run(run(args)))


if __name__ == "__main__":
    main()
