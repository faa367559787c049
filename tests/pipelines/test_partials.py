"""The rule for partial transcripts (``pipelines.partials``): the last partial of an utterance is kept
only when its utterance is known to have no final, one held per track."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.partials import LastPartials


@dataclass(frozen=True)
class P:
    track: str
    seq: int
    text: str = ""


def texts(kept: list) -> list[str]:  # type: ignore[type-arg]
    return [k.event.text for k in kept]


def test_partials_of_an_utterance_replace_each_other_and_its_final_drops_the_last() -> None:
    lp: LastPartials[P] = LastPartials()
    assert lp.partial(P("inbound", 1, "hel")) == []
    assert lp.partial(P("inbound", 1, "hello the")) == []
    assert len(lp) == 1  # one per track, however many partials arrive
    lp.final("inbound", 1)
    assert len(lp) == 0 and lp.close() == [] and lp.kept == 0 and lp.superseded == 1


def test_closing_keeps_each_tracks_last_partial_with_its_findings() -> None:
    lp: LastPartials[P] = LastPartials()
    lp.partial(P("inbound", 3, "my card"))
    lp.partial(P("inbound", 3, "my card is [REDACTED:card]"), findings=1)
    lp.partial(P("agent", 1, "one moment"))
    kept = lp.close()
    assert sorted(texts(kept)) == ["my card is [REDACTED:card]", "one moment"]
    assert {k.event.track: k.findings for k in kept} == {"inbound": 1, "agent": 0}
    assert lp.kept == 2 and len(lp) == 0 and lp.close() == []


def test_a_final_of_another_utterance_leaves_the_pending_partial_alone() -> None:
    lp: LastPartials[P] = LastPartials()
    lp.partial(P("inbound", 2, "second"))
    lp.final("inbound", 1)  # a late final of the utterance before
    lp.final("agent", 2)  # another track's utterance 2
    assert texts(lp.close()) == ["second"]


def test_a_new_utterances_partial_keeps_the_older_one_and_holds_the_newer() -> None:
    lp: LastPartials[P] = LastPartials()
    lp.partial(P("inbound", 1, "first"))
    assert texts(lp.partial(P("inbound", 2, "second"))) == ["first"]
    assert texts(lp.partial(P("inbound", 1, "late first"))) == ["late first"]  # stale: kept, the newer stays
    assert texts(lp.close()) == ["second"]


def test_a_failed_utterance_or_track_keeps_its_partial_at_once() -> None:
    lp: LastPartials[P] = LastPartials()
    lp.partial(P("inbound", 4, "four"))
    assert lp.utterance_failed("inbound", 3) == []  # not the held one
    assert texts(lp.utterance_failed("inbound", 4)) == ["four"]
    lp.partial(P("inbound", 5, "five"))
    assert lp.track_failed("agent") == []
    assert texts(lp.track_failed("inbound")) == ["five"]
    assert lp.close() == [] and lp.kept == 2
