"""An engine frame's concealment mark survives other frames being freed
(PyAV keys ``frame.opaque`` by the object's id: a shared "plc" string was
forgotten for every frame once one of them was freed)."""

from __future__ import annotations

import gc

import av

from manager.transceiver.call_media import FrameMark


def _frame(mark):
    frame = av.AudioFrame(format="s16", layout="mono", samples=960)
    frame.opaque = mark
    return frame


def test_a_mark_outlives_another_frame_with_the_same_mark():
    first, second = _frame(FrameMark("plc")), _frame(FrameMark("plc"))
    del first
    gc.collect()
    assert second.opaque == "plc"


def test_a_shared_mark_object_would_be_lost():
    """What FrameMark avoids: if this starts failing, PyAV fixed its opaque table."""
    first, second = _frame("plc"), _frame("plc")
    del first
    gc.collect()
    assert second.opaque is None
