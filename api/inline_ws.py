"""A WebSocketResponse that hands data messages to a callback inside ``data_received``.

aiohttp's ``WebSocketResponse`` puts every parsed message on a queue and wakes the handler task to
``receive()`` it: a future, a task switch and a queue round trip per message.  On a bare
receive-and-discard server that is half the cost of a frame (measured with bench/capacity.py at
900 streams: 8.9 us per frame through ``receive()``, 4.2 us handed over inline).  A Telnyx stream
is 50 small messages a second per call, so the media endpoint takes them inline instead:

* ``on_message(msg)`` runs synchronously for each TEXT or BINARY message, inside the protocol's
  ``data_received``.  It must not block and must not raise.  It returns ``True`` when it consumed
  the message; ``False`` queues the message for ``receive()`` as usual, which is how the callback
  asks the handler task to do something that needs ``await`` (close the socket).
* Everything else (close, ping, errors) goes through the queue exactly as before.

This relies on ``_post_start`` and ``WebSocketDataQueue``, which are aiohttp internals: the
dependency is pinned to the minor version it is tested with, and if either is missing the class
quietly behaves as a plain ``WebSocketResponse`` (every message through ``receive()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

try:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE  # type: ignore[attr-defined]

    INLINE_AVAILABLE = hasattr(web.WebSocketResponse, "_post_start")
except ImportError:  # pragma: no cover - a different aiohttp layout: fall back to receive()
    INLINE_AVAILABLE = False

ENABLED = True  # tests switch it off to run the plain receive() path
OnMessage = Callable[[WSMessage], bool]
_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)

if INLINE_AVAILABLE:

    class _InlineQueue(WebSocketDataQueue):  # type: ignore[misc]
        def __init__(self, protocol: Any, limit: int, *, loop: Any, on_message: OnMessage) -> None:
            super().__init__(protocol, limit, loop=loop)
            self._on_message = on_message

        def feed_data(self, data: Any, size: int) -> None:
            if data.type in _DATA and self._on_message(data):
                return
            super().feed_data(data, size)


class InlineWebSocketResponse(web.WebSocketResponse):
    def __init__(self, *, on_message: OnMessage, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_message = on_message
        self.inline = INLINE_AVAILABLE and ENABLED

    if INLINE_AVAILABLE:

        def _post_start(self, request: Any, protocol: Any, writer: Any) -> None:
            if not self.inline:
                return super()._post_start(request, protocol, writer)  # type: ignore[misc,no-any-return]
            # aiohttp 3.14's _post_start, with the message queue replaced by _InlineQueue.
            self._ws_protocol = protocol
            self._writer = writer
            self._reset_heartbeat()  # type: ignore[attr-defined]
            self._reader = _InlineQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=self._loop,
                                        on_message=self._on_message)
            self._parser = WebSocketReader(self._reader, self._max_msg_size,  # type: ignore[attr-defined]
                                           compress=bool(self._compress), decode_text=self._decode_text)
            cb = None if self._heartbeat is None else self._on_data_received  # type: ignore[attr-defined]
            request.protocol.set_parser(self._parser, data_received_cb=cb)
            request.protocol.keep_alive(False)
