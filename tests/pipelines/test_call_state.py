"""The call state table: every ending event leads through ENDING to its outcome, the first reason
stands, and events a state does not accept are refused."""

from __future__ import annotations

import pytest

from pipelines.call_state import (
    ENDING_EVENTS,
    OUTCOME,
    STATUS,
    CallEvent,
    CallMachine,
    CallState,
    InvalidTransition,
)


@pytest.mark.parametrize("event", sorted(ENDING_EVENTS, key=lambda e: e.value))
def test_each_ending_event_drains_to_its_outcome_with_its_reason(event: CallEvent) -> None:
    m = CallMachine(CallState.STREAMING)
    assert m.handle(event, "why") is CallState.ENDING and m.ending
    assert m.handle(CallEvent.DRAINED) is OUTCOME[event]
    assert (m.reason, m.detail) == (event.value, "why")


def test_the_first_ending_event_wins() -> None:
    m = CallMachine(CallState.STREAMING)
    m.handle(CallEvent.STOP, "hangup")
    m.handle(CallEvent.HANGUP)  # the socket closes after stop
    m.handle(CallEvent.SHUTDOWN)
    assert m.handle(CallEvent.DRAINED) is CallState.COMPLETED
    assert (m.reason, m.detail) == ("stop", "hangup")


def test_shutdown_and_idle_timeout_are_failures_stop_and_hangup_are_not() -> None:
    assert OUTCOME[CallEvent.STOP] is OUTCOME[CallEvent.HANGUP] is CallState.COMPLETED
    for ev in (CallEvent.SHUTDOWN, CallEvent.IDLE_TIMEOUT, CallEvent.PROTOCOL_ERROR, CallEvent.INTERNAL_ERROR):
        assert OUTCOME[ev] is CallState.FAILED


def test_call_control_states_lead_to_streaming() -> None:
    m = CallMachine(CallState.INITIATING)
    assert m.handle(CallEvent.RINGING) is CallState.RINGING
    assert m.handle(CallEvent.START) is CallState.STREAMING


@pytest.mark.parametrize(("state", "event"), [
    (CallState.STREAMING, CallEvent.START),  # a second start
    (CallState.STREAMING, CallEvent.DRAINED),  # drained before anything ended it
    (CallState.COMPLETED, CallEvent.STOP),  # terminal states accept nothing
    (CallState.FAILED, CallEvent.DRAINED),
    (CallState.RINGING, CallEvent.RINGING),
])
def test_events_a_state_does_not_accept_are_refused(state: CallState, event: CallEvent) -> None:
    m = CallMachine(state)
    with pytest.raises(InvalidTransition):
        m.handle(event)
    assert m.state is state


def test_a_dead_nodes_call_recovers_as_failed_node_restart() -> None:
    m = CallMachine(CallState.STREAMING)
    assert m.handle(CallEvent.NODE_RESTART) is CallState.FAILED
    assert m.reason == "node_restart" and STATUS[m.state] == "failed"


def test_every_state_has_a_stored_status() -> None:
    assert set(STATUS) == set(CallState)
