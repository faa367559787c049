"""Costs on the provider fan-out path: PII redaction per final transcript, local translation latency.

    python -m bench.fanout [--finals 5000] [--translations 200]

Prints:
* redaction: microseconds per final transcript (a mix of sentences with and without PII, written
  and spoken forms), and what share of one core 900 streams' finals would take;
* Apertium: start-up time, and latency per sentence through ``TranslationStage`` (p50/p99), with
  the long-lived process against the cost of one process per sentence (``apertium eng-spa``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import time

from pipelines.events import TranscriptEvent
from pipelines.redaction import Redactor
from pipelines.stt.base import Word

SENTENCES = [
    "i would like to make a payment of four hundred dollars today",
    "my card number is four one one one one one one one one one one one one one one one",
    "my social is one two three four five six seven eight nine",
    "you can reach me at five five five one two three four five six seven",
    "my email is jane dot doe at example dot com",
    "i was born on march fourteenth nineteen eighty five",
    "the invoice from march third was paid already",
    "can you call me back tomorrow morning please",
]


def bench_redaction(n: int) -> float:
    redactor = Redactor()
    rng = random.Random(1)
    events = []
    for _ in range(n):
        text = rng.choice(SENTENCES)
        words = tuple(Word(w, i * 300, i * 300 + 250) for i, w in enumerate(text.split()))
        events.append(TranscriptEvent("c", "s", "inbound", text, words, 0.9, 1, 0, len(words) * 300, True))
    t0 = time.perf_counter()
    for ev in events:
        ev.redacted(redactor)
    us = (time.perf_counter() - t0) / n * 1e6
    # 900 streams, one final every ~4 s each (the capacity benchmark's speech): 225 finals a second.
    print(f"redaction: {us:.1f} us per final transcript ({n} finals); at 225 finals/s "
          f"(900 streams) {us * 225 / 1e6 * 100:.2f} % of a core")
    return us


async def bench_apertium(n: int) -> None:
    from pipelines.translate.apertium import ApertiumTranslator
    from pipelines.translation import TranslationJob, TranslationStage

    translator = ApertiumTranslator()
    t0 = time.perf_counter()
    await translator.start()
    print(f"apertium: start (both directions) {(time.perf_counter() - t0) * 1000:.0f} ms")
    stage = TranslationStage(translator, concurrency=2, max_pending=n, deadline_s=10)
    stage.start()
    done = asyncio.Event()
    count = 0

    def finished(*_: object) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    t0 = time.perf_counter()
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        stage.submit(TranslationJob(text, "en", "es", {"seq": i}, finished, finished))
        await asyncio.sleep(0.005)  # a steady trickle, as finals arrive
    await done.wait()
    wall = time.perf_counter() - t0
    lag = stage.lag.summary()
    print(f"apertium: {n} translations through the stage in {wall:.2f} s; latency p50 {lag['p50_ms']:.1f} ms "
          f"p99 {lag['p99_ms']:.1f} ms; failed {stage.stats.deadline + stage.stats.errors + stage.stats.shed}")
    await stage.aclose()
    await translator.aclose()
    if shutil.which("apertium"):
        t0 = time.perf_counter()
        for text in SENTENCES[:5]:
            subprocess.run(["apertium", "eng-spa"], input=text.encode(), capture_output=True, check=True)  # noqa: ASYNC221 - timing it is the point
        per = (time.perf_counter() - t0) / 5 * 1000
        print(f"apertium: one process per sentence {per:.0f} ms each (x{per / max(lag['p50_ms'], 0.01):.0f} "
              f"the long-lived pipeline's p50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--finals", type=int, default=5000)
    parser.add_argument("--translations", type=int, default=200)
    args = parser.parse_args()
    bench_redaction(args.finals)
    if shutil.which("apertium"):
        asyncio.run(bench_apertium(args.translations))
    else:
        print("apertium: not installed (make sysdeps)")


if __name__ == "__main__":
    main()
