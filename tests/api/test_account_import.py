"""``api.account_import``'s line cutter on its own: an aiohttp ``StreamReader`` fed in memory, no server.

What it proves: a read is cut into lines in time linear in the read (the cutter once re-sliced the rest
of its buffer after every line, so a megabyte of newlines cost 18 s of CPU with the event loop held),
the loop gets a turn after every read, and line numbers survive over-long lines that span reads.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any
from unittest import mock

from aiohttp import StreamReader

from api.account_import import MAX_LINE, READ_CHUNK, _lines


def _request(data: bytes, pieces: int = 1 << 20) -> Any:
    reader = StreamReader(mock.Mock(_reading_paused=False), 1 << 16, loop=asyncio.get_running_loop())
    for i in range(0, len(data), pieces):
        reader.feed_data(data[i:i + pieces])
    reader.feed_eof()
    return SimpleNamespace(request=SimpleNamespace(content=reader))


async def _cut(data: bytes, pieces: int = 1 << 20) -> tuple[list[bytes | None], int]:
    """Every line ``_lines`` gives for ``data``, and how many times the loop got a turn meanwhile."""
    turns = 0
    running = True

    async def ticker() -> None:
        nonlocal turns
        while running:
            turns += 1
            await asyncio.sleep(0)

    tick = asyncio.get_running_loop().create_task(ticker())
    out: list[bytes | None] = []
    try:
        async for batch in _lines(_request(data, pieces), 5.0):
            out.extend(batch)
    finally:
        running = False
        await tick
    return out, turns


async def test_a_megabyte_of_newlines_is_cut_in_linear_time_with_the_loop_served_after_every_read() -> None:
    data = b"\n" * (1 << 20)
    t0 = time.thread_time()
    lines, turns = await _cut(data)
    cpu = time.thread_time() - t0
    assert len(lines) == 1 << 20 and set(lines) == {b""}
    assert cpu < 1.0, cpu  # the quadratic cutter took 18 s
    assert turns >= len(data) // READ_CHUNK


async def test_line_numbers_survive_over_long_lines_that_span_reads_and_crlf_split_between_reads() -> None:
    data = b"head\r\n" + b"x" * (3 * READ_CHUNK) + b"\r\nnext\r\n" + b"y" * (MAX_LINE + 1) + b"\nlast"
    for pieces in (1, 7, 4096, READ_CHUNK, 1 << 20):
        lines, _ = await _cut(data, pieces)
        assert lines == [b"head", None, b"next", None, b"last"], pieces
    lines, _ = await _cut(b"a\r\nb\r\n", 3)  # "a\r" | "\nb" | "\r\n"
    assert lines == [b"a", b"b"]
