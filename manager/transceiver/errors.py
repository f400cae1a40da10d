"""Call-level errors of the transceiver; each has one HTTP status in the control API."""

from __future__ import annotations


class TransceiverError(Exception):
    """Base class; ``str(exc)`` is a message fit for an API client."""


class InvalidRequest(TransceiverError):
    """Bad conn_id, ufrag or offer (HTTP 400)."""


class DuplicateCall(TransceiverError):
    """conn_id or ufrag already in use on this transceiver (HTTP 409)."""


class CapacityExceeded(TransceiverError):
    """The transceiver already carries ``capacity`` calls (HTTP 503)."""


class UnknownCall(TransceiverError):
    """No such conn_id (HTTP 404)."""


class CallStateConflict(TransceiverError):
    """The call's state does not allow this operation now (HTTP 409), e.g. an
    export of a call that is not connected or cannot be migrated."""


class Unsupported(TransceiverError):
    """The call cannot do this at all (HTTP 422), e.g. an ICE restart of a call
    kept on aiortc, whose ICE agent has no restart."""
