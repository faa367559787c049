"""Switchboard's one exception tree.  Every error raised on purpose, anywhere in the product, is a
``SwitchboardError``; the leaves defined elsewhere are listed with their module.

    SwitchboardError
    ├── ProtocolError            a peer broke a wire protocol; carries a WebSocket close code
    │   ├── UnsupportedData      1003: a frame type, event or encoding we do not accept
    │   ├── InvalidPayload       1007: malformed JSON, bad base64, a field or id that fails validation
    │   ├── PolicyViolation      1008: wrong auth token, events out of order, no start in time, a live call id
    │   ├── MessageTooBig        1009: a message over the configured size
    │   ├── TryAgainLater        1013: no capacity right now (stream slots, the event hub)
    │   └── InternalError        1011: our own failure while handling the stream
    ├── CodecError               audio that cannot be decoded/encoded by the codec asked for
    ├── Overflow                 a bounded buffer refused an item under its ``raise`` policy (HTTP 503)
    ├── SessionClosed            ``push`` to a recogniser session that has ended (closed or failed)
    ├── ProviderError            a speech or translation provider failed
    │   ├── ProviderUnavailable  no capacity, or the provider is down (HTTP 503)
    │   └── TranslationError     pipelines.translate.base; TranslationTimeout under it
    ├── StorageError             a storage tier refused or failed
    │   ├── MigrationError       storage.db: a migration failed or was edited after it was applied
    │   ├── MissingParent        storage.records: a record whose call is not stored
    │   └── BlobError            storage.blobs: InvalidBlobKey (400), BlobNotFound (404), BlobBackendError
    ├── SignalError              api.webrtc_signal: a WebRTC offer the rules refuse (HTTP 400)
    └── InvalidTransition        pipelines.call_state: an event the call's state does not accept (a bug)

Private control-flow errors (``pipelines.stt.cloud.Refused``, ``pipelines.translate.apertium._ProcessLost``)
are ``SwitchboardError`` too and never leave their module.

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


class SessionClosed(SwitchboardError):
    pass


class StorageError(SwitchboardError):
    pass


class ProviderError(SwitchboardError):
    pass


class ProviderUnavailable(ProviderError):
    pass
