"""The per-call publisher: what SSE, the bus tap and storage get, redacted or not."""

from __future__ import annotations

import orjson

from api.hub import EventHub, HubEvent
from api.settings import Settings
from api.speech import CallEvents, Policy
from pipelines.events import SttFailed, TranscriptEvent
from pipelines.redaction import Redactor
from pipelines.translation import TranslationJob

RAW = TranscriptEvent("c", "s", "inbound", "my card is 4111 1111 1111 1111", (), 0.9, 1, 0, 900, True)


def publish(sse_redacted: bool) -> tuple[list[bytes], list[HubEvent]]:
    hub = EventHub()
    tapped: list[HubEvent] = []
    hub.taps.append(lambda call_id, ev: tapped.append(ev))
    events = CallEvents(call_id="c", stream_id="s", language="en", target=None, hub=hub, redactor=Redactor(),
                        sse_redacted=sse_redacted, provider="scripted")
    events.publish(RAW)
    channel = hub.get("c")
    assert channel is not None
    return [ev.data for ev in channel.history], tapped  # what SSE clients get (and replay)


def test_agents_see_redacted_text_by_default_and_the_bus_always_does() -> None:
    sse, tapped = publish(sse_redacted=True)
    assert orjson.loads(sse[0])["text"] == "my card is [REDACTED:card]"
    assert orjson.loads(tapped[0].data)["text"] == "my card is [REDACTED:card]"


def test_an_organisation_may_show_its_agents_raw_text_but_the_bus_still_gets_it_redacted() -> None:
    sse, tapped = publish(sse_redacted=False)
    assert orjson.loads(sse[0])["text"] == RAW.text
    assert orjson.loads(tapped[0].data)["text"] == "my card is [REDACTED:card]"
    assert tapped[0].id == 1  # the same event, under the same id


def test_policy_takes_the_organisations_choices_over_the_nodes() -> None:
    s = Settings(stt_provider="null", sse_redacted=True, translate_to={"en": "es"})
    p = Policy.resolve(s, {"sse_redacted": False, "translate_to": {"en": "fr"},
                           "stt_chain": {"en": ["deepgram", "pocketsphinx"]}})
    assert p == Policy({"en": ["deepgram", "pocketsphinx"]}, {"en": "fr"}, False)
    assert Policy.resolve(s) == Policy({"*": ["null"]}, {"en": "es"}, True)


class Stored:
    """Stands in for ``api.persistence.Persistence``: what CallEvents hands to storage."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, TranscriptEvent, bool]] = []

    def transcript_final(self, call, ev, provider, *, language="en", redacted=False):  # type: ignore[no-untyped-def]
        self.rows.append(("final", ev, redacted))

    def transcript_partial(self, call, ev, provider, *, language="en", redacted=False):  # type: ignore[no-untyped-def]
        self.rows.append(("partial", ev, redacted))


def storing(sse_redacted: bool = True) -> tuple[CallEvents, Stored]:
    stored = Stored()
    events = CallEvents(call_id="c", stream_id="s", language="en", target=None, hub=EventHub(), redactor=Redactor(),
                        sse_redacted=sse_redacted, provider="scripted",
                        persistence=stored, record=object())  # type: ignore[arg-type]
    return events, stored


def partial(seq: int, text: str, track: str = "inbound") -> TranscriptEvent:
    return TranscriptEvent("c", "s", track, text, (), 0.5, seq, 0, 500, False)


def test_an_utterance_cut_off_by_the_end_of_the_call_keeps_one_redacted_partial() -> None:
    events, stored = storing(sse_redacted=False)  # agents may see raw text; storage never does
    events.publish(partial(1, "my card is"))
    events.publish(partial(1, "my card is 4111 1111 1111 1111"))
    events.publish(partial(1, "my card is 4111 1111 1111 1111 and"))
    assert stored.rows == []  # no row per partial
    events.close()
    assert [(kind, ev.seq, ev.text, redacted) for kind, ev, redacted in stored.rows] == [
        ("partial", 1, "my card is [REDACTED:card] and", True)]
    assert events.partials_kept == 1
    events.close()
    assert len(stored.rows) == 1


def test_an_utterance_with_its_final_keeps_no_partial() -> None:
    events, stored = storing()
    events.publish(partial(1, "hello"))
    events.publish(TranscriptEvent("c", "s", "inbound", "hello there", (), 0.9, 1, 0, 900, True))
    events.close()
    assert [(kind, ev.text) for kind, ev, _ in stored.rows] == [("final", "hello there")]
    assert events.partials_kept == 0


def test_a_failed_recogniser_or_utterance_keeps_the_partial_then_and_there() -> None:
    events, stored = storing()
    events.publish(partial(1, "please hold"))
    events.publish(SttFailed("c", "s", "inbound", "out of funds"))  # the track's recogniser is gone
    events.publish(partial(1, "one moment", track="agent"))
    events.publish(SttFailed("c", "s", "agent", "shed", 1))  # one utterance got no final
    assert [(kind, ev.track, ev.text) for kind, ev, _ in stored.rows] == [
        ("partial", "inbound", "please hold"), ("partial", "agent", "one moment")]
    events.close()
    assert len(stored.rows) == 2


class _Jobs:
    """Stands in for the translation stage: keeps what was submitted."""

    def __init__(self) -> None:
        self.jobs: list[TranslationJob] = []

    def submit(self, job: TranslationJob) -> None:
        self.jobs.append(job)


def test_finals_go_to_translation_redacted_and_truecased_while_sse_keeps_what_was_recognised() -> None:
    hub, stage = EventHub(), _Jobs()
    events = CallEvents(call_id="c", stream_id="s", language="en", target="es", hub=hub, redactor=Redactor(),
                        sse_redacted=True, provider="pocketsphinx", stage=stage)  # type: ignore[arg-type]
    events.publish(TranscriptEvent("c", "s", "inbound", "i would like to pay my card is 4111 1111 1111 1111", (),
                                   0.9, 1, 0, 900, True, "en"))
    events.publish(TranscriptEvent("c", "s", "inbound", "Hello, i'm Ana", (), 0.9, 2, 0, 900, True, "en"))
    assert [(j.text, j.source_lang, j.target_lang) for j in stage.jobs] == [
        ("I would like to pay my card is [REDACTED:card]", "en", "es"), ("Hello, i'm Ana", "en", "es")]
    channel = hub.get("c")
    assert channel is not None
    sse = [orjson.loads(ev.data) for ev in channel.history]
    assert [(e["text"], e["language"]) for e in sse] == [
        ("i would like to pay my card is [REDACTED:card]", "en"), ("Hello, i'm Ana", "en")]
