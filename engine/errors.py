"""The engine's exception tree.

    SwitchboardError
    ├── ProtocolError            a peer broke a wire protocol; carries a WebSocket close code
    │   ├── UnsupportedData      1003: a frame type, event or encoding we do not accept
    │   ├── InvalidPayload       1007: malformed JSON, bad base64, a payload that is not whole frames
    │   ├── PolicyViolation      1008: wrong auth token, events in an order the protocol forbids
    │   ├── MessageTooBig        1009: a message over the configured size
    │   ├── TryAgainLater        1013: no capacity right now (stream slots, the event hub)
    │   └── InternalError        1011: our own failure while handling the stream
    ├── CodecError               audio that cannot be decoded/encoded by the codec asked for
    ├── Overflow                 a bounded buffer refused an item under its ``raise`` policy
    └── ProviderError            a speech or translation provider failed
        └── ProviderUnavailable  no capacity (pool exhausted past its wait) or the provider is down

Callers map ``ProtocolError.close_code`` straight onto the WebSocket close frame; HTTP layers map
``Overflow`` and ``ProviderUnavailable`` to 503.
"""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base of every error Switchboard raises on purpose."""


class ProtocolError(SwitchboardError):
    close_code = 1002

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedData(ProtocolError):
    close_code = 1003


class InvalidPayload(ProtocolError):
    close_code = 1007


class PolicyViolation(ProtocolError):
    close_code = 1008


class MessageTooBig(ProtocolError):
    close_code = 1009


class TryAgainLater(ProtocolError):
    close_code = 1013


class InternalError(ProtocolError):
    close_code = 1011


class CodecError(SwitchboardError):
    pass


class Overflow(SwitchboardError):
    pass


class ProviderError(SwitchboardError):
    pass


class ProviderUnavailable(ProviderError):
    pass
