"""How many talking callers the local recogniser carries per core.

    python -m bench.stt_capacity [--callers 8,16,24,32,40,48] [--seconds 20] [--threshold 2.0] [--repeat 1]
                                 [--generic]

Drives a ``PocketsphinxProvider`` directly (no server: the recogniser alone, with its default of one
decoder process per core) with N callers talking at once in real time: espeak-ng sentences of 2-5 s
in eight voices, through G.711 mu-law at 8 kHz and the pipeline's 8 -> 16 kHz resampler, each
utterance followed by the 0.5 s of silence the segmenter's hangover adds, then ``finalize()`` (as
the segmenter ends it), then a pause of 0.3-0.8 s before the next.  Frames are pushed every 20 ms
on an absolute clock; callers start at random offsets within the first 2 s.

For each N, over the utterances finalised after ``--warmup`` s and until ``--seconds``: final
latency (final emitted - ``finalize()`` called, so the VAD hangover is not included) p50, p95 and
max, failed utterances, partials emitted per utterance (best effort: they thin out under load
first), and the decoders' CPU share.  N passes when its p95 stays under ``--threshold`` s and no
utterance failed or went undelivered (with ``--repeat R``: in most of its R runs, as this shared
machine's speed varies from run to run).  The ramp stops at the first failing N.

Baseline, in the same run: the batch-decode cost of the same utterances on one decoder alone (CPU s
per s of audio), and the ceiling it implies if finals were the only work: cores / (cost x speech
share), where speech share is the part of a caller's wall time that is pushed to the recogniser.
By default the language model is a domain LM built from the sentences (as a call centre's phrase
list); ``--generic`` uses the bundled English LM (about six times the CPU per second of audio).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import uvloop

from engine.codecs import get_codec
from engine.frames import AudioFrame
from engine.resample import Resampler
from pipelines.stt.base import SessionOptions, Transcript
from pipelines.stt.decoder_pool import DEFAULT_MODEL
from pipelines.stt.pocketsphinx import PocketsphinxProvider
from pipelines.stt.sphinx_worker import DecoderProcess

SENTENCES = [
    "hello thank you for calling how can i help you today",
    "i would like to make a payment on my account",
    "can you confirm the amount and the due date please",
    "my card was declined yesterday and i do not know why",
    "please send me a copy of the invoice by email",
    "i need to change the address on my account",
    "could you call me back tomorrow morning",
    "thank you very much have a nice day",
]
VOICES = ["en-us", "en-gb", "en+f3", "en-us+m3", "en-gb-x-rp", "en+f2", "en-029", "en-gb-scotland"]
HANGOVER_MS = 500
FRAME_BYTES = 640  # 20 ms at 16 kHz, int16
MAX_DRAIN_S = 60.0  # after the talking stops, outstanding finals get this long, then count as lost


def clock_ticks(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def utterances(tmp: Path) -> list[bytes]:
    """Every sentence in every voice: 16 kHz PCM as the pipeline hands it over, hangover included."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is required (apt-get install espeak-ng)")
    codec = get_codec("PCMU", 8000)
    out = []
    for v, voice in enumerate(VOICES):
        for s, text in enumerate(SENTENCES):
            wav = tmp / f"{v}-{s}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True,
                           capture_output=True)
            data, rate = soundfile.read(wav, dtype="float64")
            n = int(len(data) * 8000 / rate)
            x = np.fft.irfft(np.fft.rfft(data)[: n // 2 + 1], n) * n / len(data)
            samples = np.clip(np.rint(x * 32767), -32768, 32767).astype("<i2")
            samples = np.concatenate([samples, np.zeros(8 * HANGOVER_MS, dtype="<i2")])
            pcm8 = samples[: len(samples) // 160 * 160].tobytes()
            out.append(Resampler(8000, 16000).process(codec.decode(codec.encode(pcm8))))
    return out


@dataclass
class Caller:
    index: int
    script: list[bytes]
    pauses: list[float]
    start_at: float
    session: object = None
    pos: int = 0  # byte offset in the current utterance
    n: int = 0  # utterances finalised
    next_at: float = 0.0  # when the next frame is due
    t_ms: int = 0
    finalized_at: dict[int, float] = field(default_factory=dict)
    final_at: dict[int, float] = field(default_factory=dict)
    partials: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    pushed_s: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # shared by the callers of one run

    def emit(self, t: Transcript) -> None:
        if t.is_final:
            self.final_at[t.utterance] = time.monotonic()
            self.changed.set()
        else:
            self.partials[t.utterance] = self.partials.get(t.utterance, 0) + 1

    def on_failed(self, seq: int, reason: str) -> None:
        self.failed[seq] = reason
        self.changed.set()


async def run_n(provider: PocketsphinxProvider, n: int, clips: list[bytes], phrases: list[str],
                args: argparse.Namespace, pids: list[int]) -> dict[str, float]:
    rng = np.random.default_rng(n)
    t0 = time.monotonic() + 0.1
    callers = []
    changed = asyncio.Event()
    for i in range(n):
        order = rng.permutation(len(SENTENCES))
        voice = i % len(VOICES)
        script = [clips[voice * len(SENTENCES) + int(s)] for s in order] * 4
        c = Caller(i, script, list(rng.uniform(0.3, 0.8, len(script))), t0 + float(rng.uniform(0, 2)))
        c.next_at = c.start_at
        c.changed = changed
        session = await provider.open_session(SessionOptions(f"bench-{n}-{i}", phrases=phrases), c.emit)
        session.on_utterance_failed = c.on_failed
        c.session = session
        callers.append(c)
    cpu0, own0 = sum(clock_ticks(p) for p in pids), time.process_time()
    wall0 = time.monotonic()
    stop_at = t0 + args.seconds
    late = 0
    while True:  # one tick per 20 ms pushes every frame that is due
        now = time.monotonic()
        if now >= stop_at:
            break
        for c in callers:
            while now >= c.next_at and c.n < len(c.script):  # catch up if this loop fell behind
                if now - c.next_at > 0.1:
                    late += 1
                clip = c.script[c.n]
                c.session.push(AudioFrame(clip[c.pos : c.pos + FRAME_BYTES], 16000, c.t_ms))  # type: ignore[attr-defined]
                c.pos += FRAME_BYTES
                c.t_ms += 20
                c.pushed_s += 0.02
                c.next_at += 0.02
                if c.pos >= len(clip):
                    c.n += 1
                    c.pos = 0
                    c.finalized_at[c.n] = time.monotonic()
                    c.session.finalize()  # type: ignore[attr-defined]
                    c.next_at += c.pauses[c.n - 1]
                    c.t_ms += int(c.pauses[c.n - 1] * 1000)
        await asyncio.sleep(max(0.0, 0.02 - (time.monotonic() - now)))
    talk_wall = time.monotonic() - wall0
    cpu, own = sum(clock_ticks(p) for p in pids) - cpu0, time.process_time() - own0
    # Wait for the finals of every finalised utterance (bounded), then close without finalising more.
    try:
        async with asyncio.timeout(MAX_DRAIN_S):
            while any(len(c.final_at) + len(c.failed) < c.n for c in callers):
                changed.clear()
                await changed.wait()
    except TimeoutError:
        pass  # what is still missing counts as lost
    lat, lost, failed, partials, measured = [], 0, 0, [], 0
    warm_from = t0 + args.warmup
    for c in callers:
        for seq, at in c.finalized_at.items():
            if at < warm_from:
                continue
            measured += 1
            if seq in c.failed:
                failed += 1
            elif seq in c.final_at:
                lat.append(c.final_at[seq] - at)
                partials.append(c.partials.get(seq, 0))
            else:
                lost += 1
    for c in callers:  # their open utterances are finalised and decoded here, outside the measure
        await c.session.aclose(0.1)  # type: ignore[attr-defined]
    a = np.array(lat or [float("inf")])
    audio_s = sum(c.pushed_s for c in callers)
    return {
        "n": n, "utterances": measured, "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
        "max": float(a.max()), "failed": failed, "lost": lost, "late_frames": late,
        "partials_per_utt": float(np.mean(partials)) if partials else 0.0,
        "decoder_cpu": cpu / talk_wall / len(pids), "own_cpu": own / talk_wall,
        "speech_share": audio_s / n / talk_wall,
    }


async def baseline(model_phrases: list[str], clips: list[bytes], provider: PocketsphinxProvider) -> float:
    """CPU seconds one decoder spends per second of audio on batch finals, the clips one at a time."""
    pool = await provider.pool(model_phrases)
    decoder = await asyncio.get_running_loop().run_in_executor(None, DecoderProcess.start, pool.model)
    try:
        await decoder.decode(clips[0], True)  # first-use costs out of the measure
        cpu0 = clock_ticks(decoder.pid)
        for clip in clips:
            await decoder.decode(clip, True)
        return (clock_ticks(decoder.pid) - cpu0) / (sum(len(c) for c in clips) / 32000)
    finally:
        decoder.close()


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        clips = utterances(Path(tmp))
    phrases = [] if args.generic else SENTENCES
    provider = PocketsphinxProvider(max_decoders=args.decoders or None, partial_reserve=args.partial_reserve)
    cores = os.cpu_count() or 1
    try:
        await provider.warm(phrases)
        pool = await provider.pool(phrases)
        pids = [d.pid for d in pool.queue.idle]
        lm = DEFAULT_MODEL.key if args.generic else "domain (the sentences)"
        cost = await baseline(phrases, clips, provider)
        mean_clip = float(np.mean([len(c) for c in clips])) / 32000
        share = mean_clip / (mean_clip + 0.55)  # pauses average 0.55 s
        ceiling = cores / (cost * share)
        print(f"LM {lm}; {cores} cores, {provider.max_decoders} decoders, partial reserve {args.partial_reserve}; "
              f"{len(clips)} clips, mean {mean_clip:.2f} s")
        print(f"baseline: batch final costs {cost:.3f} CPU s per audio s on one decoder; speech share {share:.2f}; "
              f"finals-only ceiling {ceiling:.0f} talkers ({ceiling / cores:.1f} per core)", flush=True)
        best = 0
        for n in [int(x) for x in args.callers.split(",")]:
            votes = 0
            for _ in range(args.repeat):
                r = await run_n(provider, n, clips, phrases, args, pids)
                ok = r["p95"] < args.threshold and r["failed"] == 0 and r["lost"] == 0
                votes += ok
                print(f"N={n:3} utts={r['utterances']:4} final latency p50={r['p50']:5.2f}s p95={r['p95']:5.2f}s "
                      f"max={r['max']:5.2f}s failed={r['failed']} lost={r['lost']} "
                      f"partials/utt={r['partials_per_utt']:.1f} "
                      f"decoders cpu={r['decoder_cpu'] * 100:3.0f}% this process={r['own_cpu'] * 100:3.0f}% "
                      f"speech share={r['speech_share']:.2f} "
                      f"late frames={r['late_frames']} {'PASS' if ok else 'FAIL'}", flush=True)
            if votes * 2 <= args.repeat:
                break
            best = n
        print(f"largest N with p95 < {args.threshold:g} s: {best} talkers on {cores} cores = "
              f"{best / cores:.1f} per core (finals-only ceiling {ceiling / cores:.1f} per core)")
    finally:
        await provider.aclose()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--callers", default="8,16,24,32,40,48,64")
    parser.add_argument("--seconds", type=float, default=20.0, help="talking time per N")
    parser.add_argument("--warmup", type=float, default=4.0, help="utterances finalised before this are not measured")
    parser.add_argument("--threshold", type=float, default=2.0, help="p95 final latency bound, seconds")
    parser.add_argument("--repeat", type=int, default=1, help="runs per N; N passes on a majority")
    parser.add_argument("--decoders", type=int, default=0, help="decoder processes (default: one per core)")
    parser.add_argument("--partial-reserve", type=int, default=1,
                        help="idle decoders partials leave to finals (the provider's default: 1)")
    parser.add_argument("--generic", action="store_true", help="the bundled English LM instead of a domain LM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # failed utterances are counted in the figures instead
    sys.exit(uvloop.run(run(args)))


if __name__ == "__main__":
    main()
