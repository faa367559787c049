"""What the cloud streaming STT sessions share (``assemblyai.py``, ``deepgram.py``): buffering, sending,
keep-alive, reconnect with replay, and mapping provider time back to stream time.

Audio path
    ``push`` encodes a frame to the provider's wire encoding and appends it to ``pending``: at most
    ``max_buffer_ms`` of audio, past which ``push`` raises ``Overflow``.  ``finalize`` appends an
    end-of-utterance marker.  One writer task per connection drains ``pending`` in order, cuts the byte
    stream into ``chunk_ms`` binary messages, sends the provider's finalize message at each marker and
    its keep-alive whenever no audio went out for ``keepalive_s`` (the pipeline pushes only speech).

Replay
    What was sent for an utterance whose final has not arrived stays in ``sent``, the replay buffer.
    After a reconnect the writer sends it again before anything new, so a dropped connection loses no
    speech; text already received for those utterances is discarded, as the new connection hears their
    audio again.  ``sent`` keeps at most ``max_buffer_ms`` of audio: past it the oldest frames go
    (counted in ``replay_dropped_ms``, logged), so memory stays under twice ``max_buffer_ms`` of audio.

Finals
    A subclass turns provider messages into ``update`` (partial or committed text of an utterance) and
    ``finish`` (emit the utterance's one final: its committed text).  If no final comes within
    ``final_timeout_s`` of the finalize message, or the connection ends while closing, the utterance is
    finished with the text it has, so every utterance gets exactly one final.  Finals go out in
    utterance order: finishing utterance n first finishes any older one still open.

Time
    Providers time words from the start of the audio they heard *on this connection*: speech only, back to
    back, from 0 at each connection.  As the writer sends a frame it records an anchor (provider ms, stream ms)
    for the frame's utterance wherever the two clocks stop moving together (first frame, gaps); ``word``
    maps a provider time back through the last anchor at or before it.

Connection states (``_supervise``)::

    CONNECTING --ok--> OPEN --closed, Action.RECONNECT--> CONNECTING         (no delay, not a failure)
    OPEN --closed, Action.RETRY--> BACKOFF --0.25 s doubling to 4 s--> CONNECTING
    CONNECTING --refused, retryable--> BACKOFF, or FAILED after max_reconnects consecutive failures
    OPEN / CONNECTING --Action.FAIL (auth, funds, invalid input)--> FAILED   (``fail()``, once)
    OPEN --aclose: terminate sent, provider closes--> CLOSED

A connection that got a message or lived ``_STABLE_S`` resets the consecutive-failure count.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import aiohttp
import orjson

from engine.backoff import delay
from engine.codecs import get_codec
from engine.errors import Overflow, ProviderUnavailable, SessionClosed, SwitchboardError
from engine.frames import AudioFrame
from pipelines.stt.base import Emit, SttProvider, SttSession, Transcript, Word

log = logging.getLogger(__name__)

_STABLE_S = 5.0


class Action(enum.Enum):
    RECONNECT = "reconnect"  # transparent (e.g. max session duration): at once, not counted as a failure
    RETRY = "retry"  # after backoff, counted against max_reconnects
    FAIL = "fail"  # retrying cannot help: the session fails at once


class Refused(SwitchboardError):
    """A connection attempt or an open connection ended; ``action`` says what to do next."""

    def __init__(self, action: Action, reason: str) -> None:
        super().__init__(reason)
        self.action = action
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CloudConfig:
    sample_rate: int
    bytes_per_sample: int  # on the wire: 1 for mu-law, 2 for 16-bit PCM
    silence: bytes  # one sample of silence on the wire, to pad a short last chunk
    chunk_ms: int = 50
    max_buffer_ms: int = 10000
    keepalive_s: float = 5.0
    connect_timeout: float = 5.0
    max_reconnects: int = 5
    backoff_s: tuple[float, float] = (0.25, 4.0)  # first delay, largest delay
    final_timeout_s: float = 3.0


class CloudProvider(SttProvider):
    """What the cloud providers share: the wire format of their audio, and the HTTP client.

    ``mulaw``: the provider takes 8 kHz G.711 mu-law (encoded from the pipeline's PCM, which for a
    PCMU call gives back the bytes that came in); otherwise 16-bit PCM at ``sample_rate``.
    ``session``: an aiohttp client session to share; else the provider makes one on first use and
    closes it in ``aclose``.
    """

    def __init__(self, *, sample_rate: int, mulaw: bool, session: aiohttp.ClientSession | None,
                 chunk_ms: int, max_buffer_ms: int, keepalive_s: float, connect_timeout: float,
                 max_reconnects: int, backoff_s: tuple[float, float], final_timeout_s: float) -> None:
        if mulaw and sample_rate != 8000:
            raise ValueError(f"{self.name}: mu-law runs at 8000 Hz")
        self.sample_rate = sample_rate
        self.config = CloudConfig(sample_rate, 1 if mulaw else 2, b"\xff" if mulaw else b"\x00\x00", chunk_ms,
                                  max_buffer_ms, keepalive_s, connect_timeout, max_reconnects, backoff_s,
                                  final_timeout_s)
        self._encode: Callable[[bytes], bytes] = get_codec("PCMU", 8000).encode if mulaw else bytes
        self._http = session
        self._owns_http = session is None

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None


@dataclass(slots=True, eq=False)
class Utterance:
    number: int
    start_ms: int  # stream time of its first frame
    end_ms: int  # stream time where its last frame ends
    finalized: bool = False  # our finalize() was called
    finalize_sent: bool = False  # the finalize message went out on this connection
    sent_from: float | None = None  # provider ms of its first frame on this connection
    sent_to: float = 0.0  # provider ms where its last frame sent so far ends
    anchors: list[tuple[float, int]] = field(default_factory=list)  # (provider ms, stream ms), this connection
    committed: list[str] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    interim: str = ""
    interim_words: tuple[Word, ...] = ()
    last_partial: str = ""
    timer: asyncio.TimerHandle | None = None

    def text(self) -> str:
        return " ".join([*self.committed, self.interim] if self.interim else self.committed)

    def reset_connection(self) -> None:
        self.finalize_sent = False
        self.sent_from = None
        self.sent_to = 0.0
        self.anchors.clear()
        self.committed.clear()
        self.words.clear()
        self.interim, self.interim_words = "", ()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Frame(NamedTuple):
    utt: Utterance
    stream_ms: int
    payload: bytes  # wire-encoded
    ms: float


_Item = _Frame | Utterance  # an Utterance in a queue is its finalize marker


class CloudSession(SttSession):
    """A streaming session over one WebSocket at a time.  Subclasses set the ClassVars and implement
    ``on_message``; they may override ``_ready`` (wait for the provider's session-start message)."""

    provider: ClassVar[str]
    close_actions: ClassVar[Mapping[int, Action]]  # WebSocket close code -> what to do; others: RETRY
    keepalive_message: ClassVar[str]
    finalize_message: ClassVar[str]
    terminate_message: ClassVar[str]
    pad_last_chunk: ClassVar[bool] = False  # the provider refuses chunks under chunk_ms

    def __init__(self, emit: Emit, http: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                 config: CloudConfig, encode: Callable[[bytes], bytes]) -> None:
        self.sample_rate = config.sample_rate
        self.max_buffer_ms = config.max_buffer_ms
        self.replay_dropped_ms = 0.0
        self.reconnects = 0
        self._emit = emit
        self._http = http
        self._url = url
        self._headers = dict(headers)
        self._cfg = config
        self._encode = encode  # pcm -> wire bytes
        self._chunk_bytes = config.sample_rate * config.chunk_ms // 1000 * config.bytes_per_sample
        self._pending: deque[_Item] = deque()
        self._pending_ms = 0.0
        self._sent: deque[_Item] = deque()
        self._sent_ms = 0.0
        self._open: deque[Utterance] = deque()  # utterances with audio and no final yet, oldest first
        self._current: Utterance | None = None  # the one push() appends to
        self._count = 0
        self._conn_samples = 0
        self._last_sent = 0.0
        self._got_message = False
        self._wake = asyncio.Event()
        self._closing = False  # aclose() started: push refuses, the writer terminates when drained
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.error_code: int | None = None  # from the provider's last error message, if it sent one

    # -- the SttSession contract ------------------------------------------------------------------

    def push(self, frame: AudioFrame) -> None:
        if self.failure is not None or self._closing:
            raise SessionClosed(f"{self.provider} session is {'failed' if self.failure else 'closed'}")
        if frame.sample_rate != self.sample_rate:
            raise ValueError(f"{self.provider} session runs at {self.sample_rate} Hz, got {frame.sample_rate}")
        ms = frame.samples * 1000 / self.sample_rate
        if self._pending_ms + ms > self._cfg.max_buffer_ms:
            raise Overflow(f"{self.provider} send buffer full ({self._cfg.max_buffer_ms} ms)")
        utt = self._current
        if utt is None:
            self._count += 1
            utt = self._current = Utterance(self._count, frame.timestamp_ms, frame.end_ms)
            self._open.append(utt)
        utt.end_ms = frame.end_ms
        self._pending.append(_Frame(utt, frame.timestamp_ms, self._encode(frame.pcm), ms))
        self._pending_ms += ms
        self._wake.set()

    def finalize(self) -> None:
        utt, self._current = self._current, None
        if utt is None or self.failure is not None:
            return
        utt.finalized = True
        self._pending.append(utt)
        self._wake.set()

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        """Finalize the open utterance, send the provider's terminate message, wait (at most
        ``drain_timeout``) for its last results and its close, then cancel and release everything."""
        if self._closed:
            return
        self._closed = True
        self.finalize()
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                async with asyncio.timeout(drain_timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning("stt.drain_timeout", extra={"provider": self.provider, "timeout": drain_timeout})
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._give_up(" (closed before its final)")

    # -- for subclasses ---------------------------------------------------------------------------

    def on_message(self, msg: dict[str, Any]) -> bool:
        """Handle one provider JSON message; True if it is the last the provider sends."""
        raise NotImplementedError

    async def _ready(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Return once the provider has accepted the session (default: the handshake is enough);
        raise ``Refused`` if it will not."""

    def on_connection(self) -> None:
        """A new connection starts: reset per-connection protocol state."""

    def oldest(self) -> Utterance | None:
        return self._open[0] if self._open else None

    def utterance_at(self, provider_ms: float) -> Utterance | None:
        """The open utterance whose audio on this connection holds ``provider_ms`` (None: a finished one's)."""
        found = None
        for utt in self._open:
            if utt.sent_from is None or utt.sent_from > provider_ms + 0.5:
                break
            found = utt
        return found

    def word(self, utt: Utterance, text: str, start: float, end: float, confidence: float) -> Word:
        """A word with provider times (ms on this connection) mapped to stream time."""
        return Word(text, self._to_stream(utt, start), self._to_stream(utt, end), confidence)

    def update(self, utt: Utterance, text: str, words: tuple[Word, ...], committed: bool) -> None:
        """Record a provider hypothesis for ``utt`` (committed: text the provider will not revise) and
        emit a partial if the utterance's text changed."""
        if committed:
            if text:
                utt.committed.append(text)
                utt.words.extend(words)
            utt.interim, utt.interim_words = "", ()
        else:
            utt.interim, utt.interim_words = text, words
        shown = utt.text()
        if shown and shown != utt.last_partial:
            utt.last_partial = shown
            self._emit(Transcript(shown, False, utt.start_ms, utt.end_ms, (*utt.words, *utt.interim_words),
                                  _confidence((*utt.words, *utt.interim_words)), utt.number))

    def finish(self, utt: Utterance) -> None:
        """Emit ``utt``'s one final (its committed text, plus any interim left) and forget its audio."""
        if utt not in self._open or utt is self._current:
            return
        while self._open and self._open[0] is not utt:
            self.finish(self._open[0])  # the provider skipped it: its final is what it has
        self._open.popleft()
        if utt.timer is not None:
            utt.timer.cancel()
        while self._sent and _number(self._sent[0]) <= utt.number:
            item = self._sent.popleft()
            if isinstance(item, _Frame):
                self._sent_ms -= item.ms
        words = (*utt.words, *utt.interim_words)
        self._emit(Transcript(utt.text(), True, utt.start_ms, utt.end_ms, words, _confidence(words), utt.number))

    # -- connection management --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying retryable refusals within ``connect_timeout``) and start the supervisor;
        raise ``ProviderUnavailable`` if no connection could be made."""
        failures = 0
        try:
            async with asyncio.timeout(self._cfg.connect_timeout):
                while True:
                    try:
                        ws = await self._connect()
                        break
                    except Refused as exc:
                        failures += 1
                        if exc.action is Action.FAIL or failures > self._cfg.max_reconnects:
                            raise ProviderUnavailable(f"{self.provider}: {exc.reason}") from None
                        await asyncio.sleep(self._backoff(failures))
        except TimeoutError:
            raise ProviderUnavailable(f"{self.provider}: no session within {self._cfg.connect_timeout} s") from None
        self._task = asyncio.get_running_loop().create_task(self._supervise(ws), name=f"stt-{self.provider}")

    def _backoff(self, failures: int) -> float:
        first, largest = self._cfg.backoff_s
        return delay(failures - 1, first, largest)

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        try:
            async with asyncio.timeout(self._cfg.connect_timeout):
                return await self._connect_once()
        except TimeoutError:
            raise Refused(Action.RETRY, f"no session within {self._cfg.connect_timeout} s") from None

    async def _connect_once(self) -> aiohttp.ClientWebSocketResponse:
        try:
            ws = await self._http.ws_connect(self._url, headers=self._headers, autoping=True,
                                             timeout=aiohttp.ClientWSTimeout(ws_close=1.0))
        except aiohttp.WSServerHandshakeError as exc:
            action = Action.FAIL if exc.status in (400, 401, 402, 403) else Action.RETRY
            raise Refused(action, f"handshake refused: HTTP {exc.status}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Refused(Action.RETRY, f"cannot connect: {exc!r}") from None
        try:
            await self._ready(ws)
        except BaseException:
            await _hard_close(ws)
            raise
        return ws

    def classify(self, code: int | None) -> Action:
        if code in (None, 1000, 1005, 1006) and self.error_code is not None:
            code = self.error_code
        return self.close_actions.get(code or 0, Action.RETRY)

    async def _supervise(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        failures = 0
        while True:
            code, healthy = await self._serve(ws)
            if self._closing and (not self._open or code is None):
                return
            action = self.classify(code)
            reason = f"closed with code {code}" + (f" (error {self.error_code})" if self.error_code else "")
            if action is Action.FAIL:
                self._fail(reason)
                return
            failures = 0 if healthy else failures
            log.info("stt.reconnect", extra={"provider": self.provider, "reason": reason})
            while True:
                if action is Action.RETRY:
                    failures += 1
                    if failures > self._cfg.max_reconnects:
                        self._fail(f"{reason}; {failures - 1} reconnects failed")
                        return
                    await asyncio.sleep(self._backoff(failures))
                try:
                    ws = await self._connect()
                    break
                except Refused as exc:
                    reason, action = exc.reason, exc.action
                    if action is Action.FAIL:
                        self._fail(reason)
                        return
            self.reconnects += 1

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, bool]:
        """Run one connection until it ends; returns (close code or None if we ended it, healthy)."""
        loop = asyncio.get_running_loop()
        started, self._got_message, self.error_code = loop.time(), False, None
        self._new_connection()
        writer = loop.create_task(self._write(ws), name=f"stt-{self.provider}-write")
        reader = loop.create_task(self._read(ws), name=f"stt-{self.provider}-read")
        ended_by_us = False
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and writer.exception() is None:
                await asyncio.wait({reader})  # terminate sent: read the last results until the provider closes
            if reader.done() and reader.exception() is None:
                ended_by_us = reader.result()
            for task in (writer, reader):
                if task.done() and task.exception() is not None:
                    log.info("stt.connection_error", extra={"provider": self.provider, "error": repr(task.exception())})
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            for utt in self._open:
                if utt.timer is not None:
                    utt.timer.cancel()
            if self._closing:  # no reconnect will replay: what arrived is all there will be
                for utt in list(self._open):
                    if utt.finalized:
                        self.finish(utt)
            this = asyncio.current_task()
            await _hard_close(ws, 0.0 if this is not None and this.cancelling() else 0.2)
        healthy = self._got_message or loop.time() - started >= _STABLE_S
        return (None if ended_by_us else ws.close_code), healthy

    def _new_connection(self) -> None:
        self._conn_samples = 0
        self._last_sent = asyncio.get_running_loop().time()
        self.on_connection()
        replayed = {item.utt for item in self._sent if isinstance(item, _Frame)}
        for utt in list(self._open):
            if utt.finalize_sent and utt not in replayed:
                self.finish(utt)  # none of its audio is left to replay: keep what it has
            else:
                utt.reset_connection()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Handle messages until the connection ends (False) or the provider's last message (True)."""
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.ERROR:
                break
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            self._got_message = True
            try:
                data = orjson.loads(msg.data)
                if isinstance(data, dict) and self.on_message(data):
                    return True
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("stt.bad_message", extra={"provider": self.provider, "error": repr(exc)})
        return False

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        out = bytearray()
        for item in list(self._sent):
            await self._send(ws, item, out)
        while True:
            if self._pending:
                item = self._pending.popleft()
                if isinstance(item, _Frame):
                    self._pending_ms -= item.ms
                self._remember(item)
                await self._send(ws, item, out)
                continue
            if self._closing:
                await self._flush(ws, out, pad=self.pad_last_chunk)
                await ws.send_str(self.terminate_message)
                return
            self._wake.clear()
            idle = self._cfg.keepalive_s - (loop.time() - self._last_sent)
            if idle <= 0:
                if out:  # audio stopped without finalize(): do not leave it unsent
                    await self._flush(ws, out, pad=self.pad_last_chunk)
                else:
                    await ws.send_str(self.keepalive_message)
                self._last_sent = loop.time()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):
                    await self._wake.wait()

    def _remember(self, item: _Item) -> None:
        self._sent.append(item)
        if not isinstance(item, _Frame):
            return
        self._sent_ms += item.ms
        while self._sent_ms > self._cfg.max_buffer_ms and isinstance(self._sent[0], _Frame):
            old = self._sent.popleft()
            assert isinstance(old, _Frame)
            self._sent_ms -= old.ms
            if self.replay_dropped_ms == 0:
                log.warning("stt.replay_truncated", extra={"provider": self.provider, "utterance": old.utt.number})
            self.replay_dropped_ms += old.ms

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, item: _Item, out: bytearray) -> None:
        if isinstance(item, Utterance):
            await self._flush(ws, out, pad=self.pad_last_chunk)
            await ws.send_str(self.finalize_message)
            item.finalize_sent = True
            item.timer = asyncio.get_running_loop().call_later(self._cfg.final_timeout_s, self._overdue, item)
            return
        utt = item.utt
        t = self._conn_samples * 1000 / self.sample_rate
        if utt.sent_from is None:
            utt.sent_from = t
        if not utt.anchors or abs(utt.anchors[-1][1] + (t - utt.anchors[-1][0]) - item.stream_ms) > 1:
            utt.anchors.append((t, item.stream_ms))
        self._conn_samples += len(item.payload) // self._cfg.bytes_per_sample
        utt.sent_to = self._conn_samples * 1000 / self.sample_rate
        out += item.payload
        while len(out) >= self._chunk_bytes:
            chunk = bytes(out[: self._chunk_bytes])
            del out[: self._chunk_bytes]
            await ws.send_bytes(chunk)
            self._last_sent = asyncio.get_running_loop().time()

    async def _flush(self, ws: aiohttp.ClientWebSocketResponse, out: bytearray, *, pad: bool) -> None:
        if not out:
            return
        if pad and len(out) < self._chunk_bytes:
            missing = self._chunk_bytes - len(out)
            out += self._cfg.silence * (missing // self._cfg.bytes_per_sample)
            self._conn_samples += missing // self._cfg.bytes_per_sample
        await ws.send_bytes(bytes(out))
        out.clear()
        self._last_sent = asyncio.get_running_loop().time()

    def _overdue(self, utt: Utterance) -> None:
        utt.timer = None
        log.info("stt.final_overdue", extra={"provider": self.provider, "utterance": utt.number})
        self.finish(utt)

    def _to_stream(self, utt: Utterance, provider_ms: float) -> int:
        anchor = utt.anchors[0] if utt.anchors else (0.0, utt.start_ms)
        for a in utt.anchors:
            if a[0] > provider_ms:
                break
            anchor = a
        return max(utt.start_ms, min(utt.end_ms, round(anchor[1] + provider_ms - anchor[0])))

    def _fail(self, reason: str) -> None:
        log.warning("stt.session_failed", extra={"provider": self.provider, "reason": reason})
        self._give_up(f" ({reason})")
        self.fail(ProviderUnavailable(f"{self.provider}: {reason}"))

    def _give_up(self, why: str) -> None:
        """Count every utterance left without a final as failed; drop all buffered audio."""
        for utt in self._open:
            if utt.timer is not None:
                utt.timer.cancel()
            self.failed_utterances += 1
            log.warning("stt.utterance_failed", extra={"provider": self.provider, "utterance": utt.number,
                                                       "reason": why.strip(" ()")})
        self._open.clear()
        self._current = None
        self._pending.clear()
        self._sent.clear()
        self._pending_ms = self._sent_ms = 0.0


def _number(item: _Item) -> int:
    return item.number if isinstance(item, Utterance) else item.utt.number


def _confidence(words: tuple[Word, ...]) -> float:
    return sum(w.confidence for w in words) / len(words) if words else 0.0


async def _hard_close(ws: aiohttp.ClientWebSocketResponse, grace: float = 0.5) -> None:
    """Close politely if the peer lets us within ``grace`` seconds; aiohttp drops the connection otherwise."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
        async with asyncio.timeout(grace):
            await ws.close()
