"""A Telnyx media-stream client: plays a WAV file to the server exactly as Telnyx would.

It sends ``connected`` (with the auth token field), ``start`` with the media format, one ``media``
message per 20 ms frame paced in real time (against an absolute schedule, so it does not drift),
and ``stop``.  Unless quiet, it follows the call's SSE stream (with ``Authorization: Bearer
<api_key>``) and prints each final transcript.

With no WAV file it plays ``SAMPLE_WAV``, a few seconds of speech shipped with the package (8 kHz
mono, made once with espeak-ng), so trying a call needs no speech synthesiser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np
import orjson
import soundfile
import websockets

from engine.codecs import get_codec
from engine.frames import FRAME_MS

SAMPLE_WAV = Path(__file__).parent / "samples" / "payment.wav"
SAMPLE_TEXT = "i can pay two hundred dollars on friday"  # what SAMPLE_WAV says


def load_wav(path: str, rate: int) -> np.ndarray:
    """Mono int16 samples of ``path`` at ``rate`` (band-limited FFT resampling when rates differ)."""
    data, src_rate = soundfile.read(path, dtype="float64", always_2d=True)
    mono = data[:, 0]
    if src_rate != rate:
        n_out = int(round(len(mono) * rate / src_rate))
        spectrum = np.fft.rfft(mono)
        keep = n_out // 2 + 1
        spectrum = spectrum[:keep] if len(spectrum) >= keep else np.pad(spectrum, (0, keep - len(spectrum)))
        mono = np.fft.irfft(spectrum, n_out) * (n_out / len(data))
    return np.clip(np.round(mono * 32767), -32768, 32767).astype(np.int16)


def telnyx_messages(
    pcm: np.ndarray, *, call_id: str, stream_id: str, encoding: str, sample_rate: int, token: str | None,
    outbound: np.ndarray | None = None,
) -> list[str]:
    """Every message of the call, in order (connected, start, media..., stop).  With ``outbound``, the
    stream carries both tracks as Telnyx's ``both_tracks`` does: for each 20 ms, the inbound frame then
    the outbound one (one ``sequence_number`` series, ``chunk`` and ``timestamp`` per track), the shorter
    track padded with silence."""
    codec = get_codec(encoding, sample_rate)
    n = sample_rate * FRAME_MS // 1000
    tracks = [("inbound", pcm)] if outbound is None else [("inbound", pcm), ("outbound", outbound)]
    frames = max(-(-len(audio) // n) for _, audio in tracks)
    padded = [(name, np.concatenate([audio, np.zeros(frames * n - len(audio), dtype=np.int16)]).astype("<i2"))
              for name, audio in tracks]
    connected: dict[str, object] = {"event": "connected", "version": "1.0.0"}
    if token:
        connected["x-telnyx-streaming-auth-token"] = token
    out = [orjson.dumps(connected).decode()]
    out.append(orjson.dumps({
        "event": "start", "sequence_number": "1", "stream_id": stream_id,
        "start": {
            "user_id": str(uuid.uuid4()), "call_control_id": call_id, "call_session_id": str(uuid.uuid4()),
            "from": "+15550000001", "to": "+15550000002", "tags": [], "client_state": "",
            "custom_parameters": {},
            "media_format": {"encoding": encoding, "sample_rate": sample_rate, "channels": 1},
        },
    }).decode())
    for i in range(frames):
        for name, audio in padded:
            payload = base64.b64encode(codec.encode(audio[i * n : (i + 1) * n].tobytes())).decode()
            out.append(orjson.dumps({
                "event": "media", "sequence_number": str(len(out)), "stream_id": stream_id,
                "media": {"track": name, "chunk": str(i + 1), "timestamp": str(i * FRAME_MS), "payload": payload},
            }).decode())
    out.append(orjson.dumps({"event": "stop", "sequence_number": str(len(out)), "stream_id": stream_id,
                             "stop": {"call_control_id": call_id}}).decode())
    return out


def events_url(ws_url: str, call_id: str) -> str:
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, f"/api/calls/{call_id}/events", "", ""))


async def simulate_call(
    wav: str,
    *,
    url: str,
    call_id: str | None = None,
    encoding: str = "PCMU",
    sample_rate: int = 8000,
    token: str | None = None,
    api_key: str | None = None,
    speed: float = 1.0,
    quiet: bool = False,
) -> int:
    call_id = call_id or f"v3:{uuid.uuid4()}"
    messages = telnyx_messages(load_wav(wav, sample_rate), call_id=call_id, stream_id=str(uuid.uuid4()),
                               encoding=encoding, sample_rate=sample_rate, token=token)
    printer = None if quiet else asyncio.create_task(_print_events(events_url(url, call_id), api_key))
    print(f"call_id {call_id}: streaming {len(messages) - 3} frames of {encoding}/{sample_rate}", file=sys.stderr)
    headers = {"x-telnyx-streaming-auth-token": token} if token else {}
    try:
        return await _stream(url, headers, messages, speed, printer)
    except (OSError, websockets.InvalidHandshake) as exc:
        print(f"cannot stream to {url}: {exc}", file=sys.stderr)
        return 2
    finally:
        if printer is not None and not printer.done():
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, aiohttp.ClientError):
                await printer


async def _stream(url: str, headers: dict[str, str], messages: list[str], speed: float,
                  printer: asyncio.Task[None] | None) -> int:
    async with websockets.connect(url, additional_headers=headers, max_size=2**20) as ws:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        interval = FRAME_MS / 1000 / speed
        for i, msg in enumerate(messages):
            if i >= 2:  # media frames (and stop) are paced
                delay = t0 + (i - 2) * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                await ws.send(msg)
            except websockets.ConnectionClosed:
                break  # refused (a wrong token, say): the close code below says why
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)  # the server closes after stop
        if ws.close_code not in (None, 1000):
            print(f"server closed with {ws.close_code}: {ws.close_reason}", file=sys.stderr)
            return 1
    if printer is not None:
        await asyncio.wait_for(printer, 60)
    return 0


async def _print_events(url: str, api_key: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers,
                                                         timeout=aiohttp.ClientTimeout(total=None)) as resp:
        if resp.status != 200:
            print(f"cannot read the call's events ({url}): HTTP {resp.status} {await resp.text()}"
                  + ("" if api_key else "; pass --api-key"), file=sys.stderr)
            return
        event = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("transcript.final", "translation.final", "call.ended",
                                                         "call.started"):
                data = orjson.loads(line[6:])
                if event == "transcript.final":
                    print(f"[{data['start']/1000:7.2f}s {data['track']}] {data['text']}")
                elif event == "translation.final":
                    print(f"{'':>{11 + len(data['track'])}}  {data['target_lang']}: {data['translated']}")
                else:
                    print(f"-- {event} {data.get('call_id')}")
                if event == "call.ended":
                    return
