"""The life of one call, as states and a transition table.  No I/O.

Theory.  A call has exactly one owner on one node (``api.call_session.CallSession``), and only the
owner moves it.  Whatever ends a call (the carrier's ``stop``, the socket closing, silence past the
idle timeout, a protocol violation, our own bug, the server shutting down) is an *event*; the first
ending event wins and fixes the call's outcome and reason, later ones are ignored (a socket that
closes while the call is already ending does not rename why it ended).  Ending is not instant:
between ``ENDING`` and the terminal state the owner still owes the call's last finals,
translations and ``call.ended``; ``DRAINED`` says they went out (or their loss was reported).

A call that was ``STREAMING`` when its node died never sees ``DRAINED``: on the node's next start
``NODE_RESTART`` closes it as ``FAILED`` from the stored row (``api`` start-up recovery).

``INITIATING`` and ``RINGING`` belong to calls placed through Call Control (a later layer); a media
stream that arrives first starts the call directly in ``STREAMING``.

States and the events each accepts (anything else raises ``InvalidTransition``)::

    INITIATING --ringing--> RINGING --start--> STREAMING
    INITIATING --start----------------------> STREAMING
    STREAMING  --stop | hangup | idle_timeout | protocol_error | internal_error | shutdown--> ENDING
    ENDING     --drained--> COMPLETED | FAILED   (by the ending event, ``OUTCOME``)
    STREAMING  --node_restart--> FAILED          (recovery of a dead node's calls)
    ENDING     --node_restart--> FAILED
    ENDING     --(any ending event)--> ENDING    (ignored: the first reason stands)

The stored ``calls.status`` of each state is ``STATUS``; the ``reason`` code stored and published
with ``call.ended`` is the ending event's value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.errors import SwitchboardError


class CallState(enum.Enum):
    INITIATING = "initiating"
    RINGING = "ringing"
    STREAMING = "streaming"
    ENDING = "ending"
    COMPLETED = "completed"
    FAILED = "failed"


class CallEvent(enum.Enum):
    RINGING = "ringing"
    START = "start"
    STOP = "stop"  # the carrier said the stream is over
    HANGUP = "socket_closed"  # the socket closed without stop
    IDLE_TIMEOUT = "idle_timeout"  # no media for the idle timeout
    PROTOCOL_ERROR = "protocol_error"  # the peer broke the protocol; the socket was closed with its code
    INTERNAL_ERROR = "internal_error"  # our own failure while handling the stream
    SHUTDOWN = "server_shutdown"  # this node is stopping (SIGTERM)
    DRAINED = "drained"
    NODE_RESTART = "node_restart"


ENDING_EVENTS = frozenset({CallEvent.STOP, CallEvent.HANGUP, CallEvent.IDLE_TIMEOUT, CallEvent.PROTOCOL_ERROR,
                           CallEvent.INTERNAL_ERROR, CallEvent.SHUTDOWN})

# What a call that ended by each event is, once drained.
OUTCOME: dict[CallEvent, CallState] = {
    CallEvent.STOP: CallState.COMPLETED,
    CallEvent.HANGUP: CallState.COMPLETED,  # Telnyx closes the socket when the call is hung up
    CallEvent.IDLE_TIMEOUT: CallState.FAILED,
    CallEvent.PROTOCOL_ERROR: CallState.FAILED,
    CallEvent.INTERNAL_ERROR: CallState.FAILED,
    CallEvent.SHUTDOWN: CallState.FAILED,
    CallEvent.NODE_RESTART: CallState.FAILED,
}

# calls.status for each state (the table's CHECK lists them).
STATUS: dict[CallState, str] = {
    CallState.INITIATING: "initiating",
    CallState.RINGING: "ringing",
    CallState.STREAMING: "active",
    CallState.ENDING: "ending",
    CallState.COMPLETED: "completed",
    CallState.FAILED: "failed",
}

_TRANSITIONS: dict[tuple[CallState, CallEvent], CallState] = {
    (CallState.INITIATING, CallEvent.RINGING): CallState.RINGING,
    (CallState.INITIATING, CallEvent.START): CallState.STREAMING,
    (CallState.RINGING, CallEvent.START): CallState.STREAMING,
    **{(CallState.STREAMING, ev): CallState.ENDING for ev in ENDING_EVENTS},
    **{(CallState.ENDING, ev): CallState.ENDING for ev in ENDING_EVENTS},
    (CallState.STREAMING, CallEvent.NODE_RESTART): CallState.FAILED,
    (CallState.ENDING, CallEvent.NODE_RESTART): CallState.FAILED,
    # (ENDING, DRAINED) depends on the ending event: see CallMachine.handle.
}


class InvalidTransition(SwitchboardError):
    """An event the current state does not accept: a bug in the caller, never a peer's doing."""


@dataclass(slots=True)
class CallMachine:
    """The state of one call; ``handle`` applies an event and returns the new state."""

    state: CallState = CallState.STREAMING
    ended_by: CallEvent | None = None  # the first ending event
    detail: str = ""  # what the ending event said (a stop reason, a close code and reason)

    def handle(self, event: CallEvent, detail: str = "") -> CallState:
        if self.state is CallState.ENDING and event is CallEvent.DRAINED:
            assert self.ended_by is not None
            self.state = OUTCOME[self.ended_by]
            return self.state
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            raise InvalidTransition(f"{event.value} not allowed in state {self.state.value}")
        if event in ENDING_EVENTS or event is CallEvent.NODE_RESTART:
            if self.ended_by is None:
                self.ended_by, self.detail = event, detail
        self.state = new
        return new

    @property
    def ending(self) -> bool:
        return self.state is CallState.ENDING

    @property
    def reason(self) -> str:
        """The stored and published end reason: the ending event's code."""
        return self.ended_by.value if self.ended_by is not None else ""
