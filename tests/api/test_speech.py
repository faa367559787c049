"""The per-call publisher: what SSE, the bus tap and storage get, redacted or not."""

from __future__ import annotations

import orjson

from api.hub import EventHub, HubEvent
from api.settings import Settings
from api.speech import CallEvents, Policy
from pipelines.events import TranscriptEvent
from pipelines.redaction import Redactor

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
