"""The translation stage against a stuck provider: memory stays bounded, every job is accounted for,
and submitting never waits."""

from __future__ import annotations

import asyncio
import time

from pipelines.translate.base import Translation
from pipelines.translate.openai_compat import OpenAICompatTranslator
from pipelines.translation import TranslationJob, TranslationStage
from tests.fakes.openai_compat import FakeOpenAI


def job(i: int, done: list, failed: list) -> TranslationJob:  # type: ignore[type-arg]
    return TranslationJob(f"sentence {i}", "en", "es", {"seq": i}, lambda j, t: done.append((j, t)),
                          lambda j, why: failed.append((j.context["seq"], why)))


async def test_a_stalled_provider_sheds_the_oldest_and_misses_deadlines_visibly() -> None:
    fake = FakeOpenAI(transform=lambda t: f"[es] {t}")
    await fake.start()
    translator = OpenAICompatTranslator("test-key", base_url=fake.base_url, max_concurrency=2)
    stage = TranslationStage(translator, concurrency=2, max_pending=50, deadline_s=0.5)
    stage.start()
    fake.stall_next(1000, 30.0)  # the provider accepts requests and never answers
    done: list = []  # type: ignore[type-arg]
    failed: list[tuple[int, str]] = []
    try:
        t0 = time.perf_counter()
        for i in range(1000):
            stage.submit(job(i, done, failed))
            assert stage.pending <= 50  # bounded at every step
        submit_ms = (time.perf_counter() - t0) * 1000
        await asyncio.sleep(1.5)  # well past every deadline
        assert stage.pending == 0
        assert done == []
        reasons = {why for _, why in failed}
        assert reasons <= {"shed", "deadline"} and "shed" in reasons and "deadline" in reasons
        assert sorted(seq for seq, _ in failed) == list(range(1000))  # every job reported exactly once
        # The submits ran before any worker could take a job: the newest 50 stayed, the rest were shed.
        assert (stage.stats.shed, stage.stats.deadline) == (950, 50)
        assert {seq for seq, why in failed if why == "deadline"} == set(range(950, 1000))
        assert fake.max_in_flight <= 2
        print(f"\n1000 submits took {submit_ms:.1f} ms; shed {stage.stats.shed}, deadline {stage.stats.deadline}")
    finally:
        await stage.aclose()
        await translator.aclose()
        await fake.aclose()


async def test_results_arrive_with_their_context_and_lag_is_measured() -> None:
    fake = FakeOpenAI(transform=lambda t: f"[es] {t}")
    await fake.start()
    translator = OpenAICompatTranslator("test-key", base_url=fake.base_url)
    stage = TranslationStage(translator, concurrency=3, max_pending=10, deadline_s=5)
    stage.start()
    done: list[tuple[TranslationJob, Translation]] = []
    failed: list = []  # type: ignore[type-arg]
    try:
        for i in range(5):
            stage.submit(job(i, done, failed))
        for _ in range(100):
            if len(done) == 5:
                break
            await asyncio.sleep(0.02)
        assert failed == []
        got = sorted((j.context["seq"], t.translated) for j, t in done)
        assert got == [(i, f"[es] sentence {i}") for i in range(5)]
        assert stage.lag.summary()["count"] == 5
    finally:
        await stage.aclose()
        await translator.aclose()
        await fake.aclose()
