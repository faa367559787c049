"""The local recogniser's scheduling rules, fed events directly (no processes, no event loop)."""

from __future__ import annotations

import pytest

from engine.errors import Overflow
from pipelines.stt.decode_queue import AudioBudget, DecodeQueue, Job


def job(owner: object, seq: int, ms: int, final: bool = True) -> Job:
    return Job(owner, seq, bytes(ms * 32), 0, ms, final, lambda *_: None)


def test_finals_go_to_idle_decoders_in_fifo_order_and_missing_decoders_are_started_up_to_the_bound() -> None:
    q: DecodeQueue[str] = DecodeQueue(2, AudioBudget(60_000))
    jobs = [job("a", 1, 1000), job("b", 1, 1000), job("c", 1, 1000)]
    for j in jobs:
        q.submit(j)
    run, start = q.next_steps()
    assert run == [] and start == 2 and q.starting == 2  # bounded: 3 jobs wait, 2 decoders may exist
    assert q.next_steps() == ([], 0)  # already starting: not asked twice
    q.started("d1")
    run, start = q.next_steps()
    assert run == [("d1", jobs[0])] and start == 0
    q.started("d2")
    assert q.next_steps() == ([("d2", jobs[1])], 0)
    assert q.done("d1", healthy=True) is jobs[0]
    assert q.next_steps() == ([("d1", jobs[2])], 0)
    assert q.waiting_ms == 0 and q.budget.used_ms == 0


def test_a_partial_runs_only_on_an_idle_decoder_when_no_final_waits() -> None:
    q: DecodeQueue[str] = DecodeQueue(1, AudioBudget(60_000))
    assert q.try_partial(job("a", 1, 200, final=False)) is None  # no decoder yet: skipped, none started
    assert q.next_steps() == ([], 0)
    q.reserve_starts()
    q.started("d1")
    p = job("a", 1, 200, final=False)
    assert q.try_partial(p) == "d1" and q.busy == {"d1": p}
    assert q.try_partial(job("b", 1, 200, final=False)) is None  # busy
    final = job("b", 1, 1000)
    q.submit(final)
    q.done("d1", healthy=True)
    assert not q.can_take_partial()  # idle, but a final waits: it goes first
    assert q.try_partial(job("a", 1, 400, final=False)) is None
    assert q.next_steps() == ([("d1", final)], 0)


def test_the_audio_budget_is_shared_by_queues_and_a_final_past_its_share_is_refused_whole() -> None:
    budget = AudioBudget(3000)
    q1: DecodeQueue[str] = DecodeQueue(1, budget)
    q2: DecodeQueue[str] = DecodeQueue(1, budget)
    q1.submit(job("a", 1, 2000))
    with pytest.raises(Overflow, match="queue full"):
        q2.submit(job("b", 1, 1600))  # two owners: 1500 ms each
    assert not q2.waiting and budget.used_ms == 2000
    assert q2.submit(job("b", 2, 1000)) == []  # fits as it is
    q1.next_steps()
    q1.started("d1")
    q1.next_steps()  # the job leaves the budget when a decoder takes it
    assert budget.used_ms == 1000


def test_a_call_within_its_share_is_served_by_shedding_the_newest_jobs_of_the_call_furthest_over() -> None:
    budget = AudioBudget(3000)
    q1: DecodeQueue[str] = DecodeQueue(1, budget)
    q2: DecodeQueue[str] = DecodeQueue(1, budget)  # another language model: the bound is the provider's
    for seq in (1, 2, 3):
        q1.submit(job("hog", seq, 1000))  # alone, it may fill the whole bound
    shed = q2.submit(job("victim", 1, 1000))
    assert [(j.owner, j.seq) for j in shed] == [("hog", 3)] and budget.shed == 1
    assert [j.seq for j in q1.waiting] == [1, 2] and [j.owner for j in q2.waiting] == ["victim"]
    assert budget.used_ms == 3000 and q1.waiting_ms == 2000
    with pytest.raises(Overflow, match="share"):
        q1.submit(job("hog", 4, 1000))  # over its share (1500 ms of two owners'): refused, nothing shed
    assert budget.used_ms == 3000 and len(q2.waiting) == 1


def test_an_owners_oldest_waiting_job_is_never_shed_and_a_plan_short_of_room_sheds_nothing() -> None:
    budget = AudioBudget(3000)
    q: DecodeQueue[str] = DecodeQueue(1, budget)
    q.submit(job("a", 1, 1500))
    q.submit(job("b", 1, 1000))
    q.submit(job("b", 2, 500))
    # c is within its share (1000 ms of three owners'); a is over but has one job only, and shedding
    # b's newest (500 ms) alone would not make room: refused, and nothing is shed.
    with pytest.raises(Overflow, match="queue full"):
        q.submit(job("c", 1, 1000))
    assert [(j.owner, j.seq) for j in q.waiting] == [("a", 1), ("b", 1), ("b", 2)] and budget.shed == 0


def test_an_empty_budget_admits_one_job_longer_than_the_bound() -> None:
    q: DecodeQueue[str] = DecodeQueue(1, AudioBudget(1000))
    q.submit(job("a", 1, 1500))
    with pytest.raises(Overflow):
        q.submit(job("a", 2, 20))


def test_a_failed_decoder_is_forgotten_and_replaced_while_finals_wait() -> None:
    q: DecodeQueue[str] = DecodeQueue(1, AudioBudget(60_000))
    q.reserve_starts()
    q.started("d1")
    j1, j2 = job("a", 1, 500), job("a", 2, 500)
    q.submit(j1)
    q.submit(j2)
    assert q.next_steps() == ([("d1", j1)], 0)
    assert q.done("d1", healthy=False) is j1
    assert q.discarded == 1 and q.decoders == 0
    assert q.next_steps() == ([], 1)  # a fresh one, never d1 again
    q.started("d2")
    assert q.next_steps() == ([("d2", j2)], 0)


def test_when_no_decoder_can_start_the_waiting_finals_are_handed_back_to_fail() -> None:
    budget = AudioBudget(60_000)
    q: DecodeQueue[str] = DecodeQueue(2, budget)
    jobs = [job("a", 1, 500), job("b", 1, 500)]
    for j in jobs:
        q.submit(j)
    assert q.next_steps() == ([], 2)
    assert q.start_failed() == []  # another is still starting: the jobs may wait for it
    assert q.start_failed() == jobs
    assert not q.waiting and budget.used_ms == 0 and q.decoders == 0


def test_cancel_takes_back_only_its_owners_waiting_jobs() -> None:
    q: DecodeQueue[str] = DecodeQueue(1, AudioBudget(60_000))
    a1, b1, a2 = job("a", 1, 100), job("b", 1, 200), job("a", 2, 300)
    for j in (a1, b1, a2):
        q.submit(j)
    assert q.cancel("a") == [a1, a2]
    assert list(q.waiting) == [b1] and q.waiting_ms == 200 and q.budget.used_ms == 200


def test_partials_leave_the_reserved_decoders_to_finals_but_one_decoder_always_serves_partials() -> None:
    q: DecodeQueue[str] = DecodeQueue(2, AudioBudget(60_000), partial_reserve=1)
    q.reserve_starts()
    q.started("d1")
    q.started("d2")
    assert q.try_partial(job("a", 1, 200, final=False)) is not None
    assert q.try_partial(job("b", 1, 200, final=False)) is None  # the last idle decoder is kept for finals
    final = job("c", 1, 1000)
    q.submit(final)
    run, _ = q.next_steps()
    assert [j for _, j in run] == [final]  # at once, though a partial runs
    alone: DecodeQueue[str] = DecodeQueue(1, AudioBudget(60_000), partial_reserve=1)
    alone.reserve_starts()
    alone.started("d")
    assert alone.try_partial(job("a", 1, 200, final=False)) == "d"  # the reserve never takes every decoder
