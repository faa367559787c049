"""A cold tier that fails mid-run: the local store, whose deletes raise ``OSError`` after ``ok`` of them
(a network fault in the middle of a purge, a wipe or an erasure)."""

from __future__ import annotations

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
