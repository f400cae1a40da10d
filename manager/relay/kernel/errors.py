"""The error every datapath operation raises for a reason the operator can act on."""

from __future__ import annotations


class DatapathError(RuntimeError):
    """A datapath operation failed for a reason the operator can act on."""
