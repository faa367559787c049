"""Cold tiers that misbehave mid-run: the local store, whose deletes raise ``OSError`` after ``ok`` of them
(a network fault in the middle of a purge, a wipe or an erasure), or wait until they are let go."""

from __future__ import annotations

import asyncio
from pathlib import Path

from storage.blobs import LocalBlobStore


class FailingBlobs(LocalBlobStore):
    def __init__(self, root: Path, ok: int) -> None:
        super().__init__(root, b"k" * 32)
        self.ok = ok

    async def delete(self, key: str) -> None:
        if self.ok <= 0:
            raise OSError("cold tier unreachable")
        self.ok -= 1
        await super().delete(key)


class GatedBlobs(LocalBlobStore):
    """The local store whose first delete waits for ``gate``, after setting ``entered``: a job held in the
    middle of its run (another node's run of the same job is tried meanwhile)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, b"k" * 32)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def delete(self, key: str) -> None:
        if not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        await super().delete(key)
