"""The offline summary and score (``pipelines/summary.py``): each rule of its table, on redacted lines."""

from __future__ import annotations

from pipelines.summary import summarize


def test_a_promise_with_its_amount_and_date_the_disclosure_and_no_dispute() -> None:
    s = summarize([
        ("outbound", "Hello, this is an attempt to collect a debt and any information will be used for that."),
        ("inbound", "Hi, yes, I know about the balance."),
        ("inbound", "I can pay two hundred dollars on Friday."),
        ("outbound", "Thank you, I will note that."),
    ])
    assert s.score == {"disclosure_spoken": True, "promise_to_pay": {"amount": "two hundred dollars",
                                                                      "date": "friday"},
                       "dispute": False, "callback_requested": False, "consumer_lines": 2, "agent_lines": 2}
    assert s.text.startswith("“Hi, yes, I know about the balance.”") and "two hundred dollars" in s.text
    assert s.provider == "rules"


def test_a_dispute_a_callback_and_markers_kept_and_nothing_said() -> None:
    s = summarize([("inbound", "This is not my debt, my card is [REDACTED:card]."),
                   ("inbound", "Call me back tomorrow."), ("agent", "Okay.")])
    assert s.score["dispute"] and s.score["callback_requested"] and s.score["promise_to_pay"] is None
    assert not s.score["disclosure_spoken"] and "[REDACTED:card]" in s.text
    assert summarize([]).text == "Nothing was said." and summarize([("inbound", "  ")]).score["consumer_lines"] == 0
    assert summarize([("inbound", "I will pay $120.50 by 12/15")]).score["promise_to_pay"] == {
        "amount": "$120.50", "date": "12/15"}
