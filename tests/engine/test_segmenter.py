"""The VAD segmenter on real espeak-ng speech: utterance counts and boundaries, with pauses and noise."""

from __future__ import annotations

import numpy as np
import pytest

from engine.frames import AudioFrame
from engine.segmenter import (
    Segmenter,
    SegmenterConfig,
    SpeechStarted,
    UtteranceAudio,
    UtteranceEnded,
    VadState,
)
from tests.speech import synthesize

TEXTS = ["please confirm your account number", "i would like to make a payment today",
         "can you call me back tomorrow morning"]
RATE = 8000
FRAME = RATE // 50


def frames(pcm: np.ndarray, rate: int = RATE) -> list[AudioFrame]:
    n = rate // 50
    pcm = pcm[: len(pcm) // n * n].astype("<i2")
    return [AudioFrame(pcm[i : i + n].tobytes(), rate, i * 1000 // rate) for i in range(0, len(pcm), n)]


def run(seg: Segmenter, audio: list[AudioFrame]) -> list[object]:
    events: list[object] = []
    for f in audio:
        events.extend(seg.process(f))
    events.extend(seg.flush())
    return events


def speech_with_pauses(
    pause_ms: int = 1000, noise_db: float | None = None, seed: int = 7
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Three sentences separated by pauses; returns audio and each sentence's (start_ms, end_ms)."""
    gap = np.zeros(RATE * pause_ms // 1000, dtype=np.float64)
    parts: list[np.ndarray] = [gap]
    spans = []
    at = len(gap)
    for text in TEXTS:
        s = synthesize(text, rate=RATE, pad_ms=0).astype(np.float64)
        spans.append((at * 1000 // RATE, (at + len(s)) * 1000 // RATE))
        parts += [s, gap]
        at += len(s) + len(gap)
    audio = np.concatenate(parts)
    if noise_db is not None:
        rms = np.sqrt(np.mean(audio[audio != 0] ** 2))
        noise = np.random.default_rng(seed).normal(0, rms * 10 ** (noise_db / 20), len(audio))
        audio = audio + noise
    return np.clip(audio, -32768, 32767).astype(np.int16), spans


@pytest.mark.parametrize("noise_db", [None, -20.0], ids=["clean", "noise-20dB"])
def test_three_sentences_with_pauses_give_three_utterances_covering_the_speech(noise_db: float | None) -> None:
    audio, spans = speech_with_pauses(noise_db=noise_db)
    events = run(Segmenter(SegmenterConfig(aggressiveness=3 if noise_db else 2)), frames(audio))
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    started = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(ended) == len(started) == 3, [(e.start_ms, e.end_ms) for e in ended]
    for ev, (s, e) in zip(ended, spans, strict=True):
        assert ev.reason == "silence"
        # Boundaries within the preroll (200 ms) plus onset before, and within the hangover after.
        assert s - 300 <= ev.start_ms <= s + 150, (ev, s)
        assert e - 100 <= ev.end_ms <= e + 700, (ev, e)


def test_utterance_audio_is_contiguous_and_tagged_with_its_utterance() -> None:
    audio, _ = speech_with_pauses()
    events = run(Segmenter(), frames(audio))
    by_utt: dict[int, list[AudioFrame]] = {}
    for e in events:
        if isinstance(e, UtteranceAudio):
            by_utt.setdefault(e.utterance, []).append(e.frame)
    ended = {e.utterance: e for e in events if isinstance(e, UtteranceEnded)}
    assert sorted(by_utt) == [1, 2, 3]
    for n, fs in by_utt.items():
        stamps = [f.timestamp_ms for f in fs]
        assert stamps == list(range(stamps[0], stamps[0] + 20 * len(fs), 20)), "gap or repeat inside utterance"
        assert stamps[0] == ended[n].start_ms and fs[-1].end_ms == ended[n].end_ms


@pytest.mark.parametrize("noise_std", [10, 30, 100, 300])
@pytest.mark.parametrize("aggressiveness", [2, 3])
def test_silence_then_a_noise_floor_yields_no_utterance(noise_std: int, aggressiveness: int) -> None:
    # webrtcvad calls the onset of a new noise floor voiced for ~80 ms; the start rule must not.
    rng = np.random.default_rng(1)
    audio = np.concatenate([np.zeros(RATE, np.int16), rng.normal(0, noise_std, RATE * 4).astype(np.int16)])
    assert run(Segmenter(SegmenterConfig(aggressiveness=aggressiveness)), frames(audio)) == []


def test_max_utterance_length_splits_long_speech() -> None:
    long_speech = np.concatenate([synthesize(t, rate=RATE, pad_ms=0) for t in TEXTS * 2])
    cfg = SegmenterConfig(max_utterance_ms=2000, hangover_ms=800)
    events = run(Segmenter(cfg), frames(long_speech))
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    assert any(e.reason == "max_length" for e in ended)
    assert all(e.end_ms - e.start_ms <= 2000 + 20 for e in ended)


def test_flush_ends_an_open_utterance_and_returns_to_silence() -> None:
    seg = Segmenter()
    speech = frames(synthesize(TEXTS[0], rate=RATE, pad_ms=0))
    for f in speech[: len(speech) // 2]:
        seg.process(f)
    assert seg.state in (VadState.SPEECH, VadState.HANGOVER)
    (ev,) = seg.flush()
    assert isinstance(ev, UtteranceEnded) and ev.reason == "flush"
    assert seg.state is VadState.SILENCE


def test_works_at_16khz() -> None:
    audio = np.concatenate([np.zeros(16000, np.int16), synthesize(TEXTS[1], rate=16000, pad_ms=0),
                            np.zeros(16000, np.int16)])
    events = run(Segmenter(), frames(audio, 16000))
    assert sum(isinstance(e, UtteranceEnded) for e in events) == 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        SegmenterConfig(aggressiveness=4)
    with pytest.raises(ValueError):
        SegmenterConfig(start_voiced=6, start_window=5)
