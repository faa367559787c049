"""Which partial transcripts are kept: the last one of an utterance that never got a final.

Partials arrive several times a second per speaking track and each supersedes the one before; a final
supersedes them all.  Storing them as they come would write a row per partial for words the final
repeats, so none is stored as it arrives.  What is worth keeping is the words of an utterance that would
otherwise leave no trace: the call ended mid-utterance and the recogniser gave no final before the drain
deadline, the recogniser failed (or was failed over and the next one gave no final), the utterance was
refused or shed by the decode queue.  (A cloud session whose final is overdue ends the utterance itself
with the text it has, as a final, ``pipelines.stt.cloud``: that one is stored as a final.)  Each track
holds its latest partial, one per track (the bound: at most as many as the call has tracks), and gives
it up, *keeps* it, when its utterance is known to have no final:

    event                          pending partial (seq p)      result
    partial s, none pending        -                            pending := s
    partial s, s == p              replaced                     pending := s
    partial s, s != p              the older one is kept        pending := the newer one
    final s, s == p                dropped (the final says it)  none pending
    final s, s != p                unchanged (finals of other utterances may come out of order)
    utterance s failed, s == p     kept                         none pending
    track failed                   kept                         none pending
    close (the call is over)       every track's kept           none pending

A kept partial whose final comes after all (late, out of order) is not lost nor doubled: storage lets a
final replace the partial row of the same utterance (``storage.records.TranscriptStored``), never the
reverse.  The caller feeds events already redacted: what is kept is what was published, never the raw
text.  No I/O here; ``api.speech.CallEvents`` stores what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Utterance(Protocol):
    @property
    def track(self) -> str: ...

    @property
    def seq(self) -> int: ...


E = TypeVar("E", bound=Utterance)


@dataclass(frozen=True, slots=True)
class Pending(Generic[E]):
    event: E
    findings: int  # redactions made in it (stored as the row's ``redacted`` flag)


class LastPartials(Generic[E]):
    """The table above, per track.  Each method returns what is kept now (usually nothing)."""

    __slots__ = ("_by_track", "kept", "superseded")

    def __init__(self) -> None:
        self._by_track: dict[str, Pending[E]] = {}
        self.kept = 0  # partials given up for storage
        self.superseded = 0  # partials whose final came (the normal case)

    def __len__(self) -> int:
        return len(self._by_track)

    def partial(self, event: E, findings: int = 0) -> list[Pending[E]]:
        held = self._by_track.get(event.track)
        new = Pending(event, findings)
        if held is None or held.event.seq == event.seq:
            self._by_track[event.track] = new
            return []
        older, newer = (held, new) if held.event.seq < event.seq else (new, held)
        self._by_track[event.track] = newer
        return self._keep([older])

    def final(self, track: str, seq: int) -> None:
        held = self._by_track.get(track)
        if held is not None and held.event.seq == seq:
            del self._by_track[track]
            self.superseded += 1

    def utterance_failed(self, track: str, seq: int) -> list[Pending[E]]:
        held = self._by_track.get(track)
        if held is None or held.event.seq != seq:
            return []
        del self._by_track[track]
        return self._keep([held])

    def track_failed(self, track: str) -> list[Pending[E]]:
        held = self._by_track.pop(track, None)
        return self._keep([held] if held is not None else [])

    def close(self) -> list[Pending[E]]:
        held = list(self._by_track.values())
        self._by_track.clear()
        return self._keep(held)

    def _keep(self, items: list[Pending[E]]) -> list[Pending[E]]:
        self.kept += len(items)
        return items
