"""What a killed process left in the recording spool, made into WAV files again.

A recording's files (``pipelines.recording``): ``<name>.json`` (sidecar: what it belongs to),
``<name>.<track>.pcm`` (raw PCM appended during the call), ``<name>.wav`` (built after the call,
deleted once stored).  What a crash can leave, and what ``rebuild`` makes of it:

- **PCM spools**, with or without a WAV: the call was running, or its WAV was being built.  The WAV
  is built again from the PCM (a half-built one is overwritten).  The PCM holds every chunk the
  spool thread wrote; the last second or so, still in memory, died with the process.
- **A WAV alone**: built, not yet stored.  Its header is checked and, when its writer died before
  patching it (``wave`` writes sizes of 0 first), repaired: the data runs to the end of the file.
- **A sidecar alone**: nothing was recorded, or the recording was stored and only the deletion of
  its sidecar was cut short.  Nothing to save.

A recording without a readable sidecar cannot be attributed to a call, and a WAV that is not 16-bit
PCM cannot be repaired: ``set_aside`` moves such files to ``<spool>/unrecoverable/`` for a person to
look at.  Nothing here deletes audio; ``remove`` is for the caller, once the recording is stored.

Everything here blocks (file I/O): run it in a thread.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from engine.frames import Track
from pipelines.recording import RecordingFile, build_wav, sha256_of

UNRECOVERABLE = "unrecoverable"


@dataclass
class Leftover:
    """The files of one recording ``name`` found in the spool directory."""

    name: str
    sidecar: Path | None = None
    pcm: dict[Track, Path] = field(default_factory=dict)
    wav: Path | None = None
    files: list[Path] = field(default_factory=list)  # all of them, the above included

    @property
    def has_audio(self) -> bool:
        return any(p.stat().st_size for p in self.pcm.values()) or self.wav is not None


def find_leftovers(spool_dir: Path) -> list[Leftover]:
    """The recordings with files in ``spool_dir`` (not its subdirectories), by name."""
    found: dict[str, Leftover] = {}
    if not spool_dir.is_dir():
        return []
    for path in sorted(spool_dir.iterdir()):
        if not path.is_file():
            continue
        name, _, rest = path.name.partition(".")
        left = found.setdefault(name, Leftover(name))
        left.files.append(path)
        if rest == "json":
            left.sidecar = path
        elif rest == "wav":
            left.wav = path
        elif rest.endswith(".pcm") and rest[:-4] in Track._value2member_map_:
            left.pcm[Track(rest[:-4])] = path
    return list(found.values())


def rebuild(left: Leftover, sample_rate: int) -> tuple[RecordingFile, str] | None:
    """The recording as a WAV file, and how it was obtained; None when there is no audio at all.
    Raises ``ValueError`` for a WAV that cannot be repaired (no PCM left to rebuild it from)."""
    if any(p.stat().st_size >= 2 for p in left.pcm.values()):
        out = left.wav or left.pcm[next(iter(left.pcm))].with_name(f"{left.name}.wav")
        rec = build_wav(left.pcm, out, sample_rate)
        if out not in left.files:
            left.files.append(out)
        left.wav = out
        return rec, "rebuilt from PCM spools"
    if left.wav is None:
        return None
    rec, repaired = repair_wav(left.wav)
    return rec, "WAV header repaired" if repaired else "WAV intact"


def repair_wav(path: Path) -> tuple[RecordingFile, bool]:
    """Check a 16-bit PCM WAV's header against the file's size and fix it if its writer died.

    The data chunk is taken to run to the end of the file (as this code's writer makes it), cut to
    whole frames.  Returns the recording and whether anything was changed.  ``ValueError`` when
    the file is not a RIFF/WAVE file with 16-bit PCM ``fmt `` and ``data`` chunks.
    """
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            raise ValueError("not a RIFF/WAVE file")
        pos, fmt = 12, None
        while pos + 8 <= size:
            f.seek(pos)
            chunk, length = struct.unpack("<4sI", f.read(8))
            if chunk == b"fmt ":
                if length < 16:
                    raise ValueError("fmt chunk too short")
                fmt = struct.unpack("<HHIIHH", f.read(16))
            elif chunk == b"data":
                if fmt is None:
                    raise ValueError("data chunk before fmt chunk")
                audio_format, channels, rate, _, block_align, bits = fmt
                if audio_format != 1 or bits != 16 or channels < 1 or block_align != 2 * channels or rate <= 0:
                    raise ValueError(f"not 16-bit PCM (format {audio_format}, {bits} bits, {channels} channels)")
                start = pos + 8
                data_len = (size - start) // block_align * block_align
                changed = length != data_len or size != start + data_len
                if changed:
                    f.truncate(start + data_len)  # at most a partial frame goes
                    f.seek(pos + 4)
                    f.write(struct.pack("<I", data_len))
                    f.seek(4)
                    f.write(struct.pack("<I", start + data_len - 8))
                break
            pos += 8 + length + (length & 1)
        else:
            raise ValueError("no data chunk")
    frames = data_len // block_align
    return RecordingFile(path, start + data_len, frames * 1000 // rate, channels, rate, sha256_of(path)), changed


def set_aside(left: Leftover, spool_dir: Path) -> list[Path]:
    """Move the recording's files to ``<spool_dir>/unrecoverable/`` (never over another file)."""
    dest = spool_dir / UNRECOVERABLE
    dest.mkdir(exist_ok=True)
    moved = []
    for path in left.files:
        if not path.exists():
            continue
        target, n = dest / path.name, 1
        while target.exists():
            target, n = dest / f"{path.name}.{n}", n + 1
        path.replace(target)
        moved.append(target)
    return moved


def remove(left: Leftover) -> None:
    """Delete the recording's files: only once it is stored."""
    for path in left.files:
        path.unlink(missing_ok=True)
