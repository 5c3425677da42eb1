"""FlowControl: each reason to stop reading is lifted only by its own resume."""

from __future__ import annotations

import asyncio

import pytest

from proxy.flow import FlowControl


class _Transport(asyncio.Transport):
    """Records what FlowControl asks of it."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.closing = False
        self.calls: list[str] = []

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.calls.append("pause")

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True
        self.calls.append("resume")


def _flow() -> tuple[FlowControl, _Transport]:
    flow = FlowControl()
    flow.transport = transport = _Transport()
    return flow, transport


@pytest.mark.parametrize("first, second", [("peer", "queue"), ("queue", "peer")])
def test_reading_resumes_only_once_every_reason_to_pause_is_lifted(first: str, second: str) -> None:
    flow, transport = _flow()
    getattr(flow, f"pause_for_{first}")()
    getattr(flow, f"pause_for_{second}")()
    getattr(flow, f"resume_for_{first}")()
    assert not transport.reading, f"the {first} resuming undid the pause for the {second}"
    getattr(flow, f"resume_for_{second}")()
    assert transport.reading and transport.calls == ["pause", "resume"]


def test_a_resume_for_a_reason_that_never_paused_changes_nothing() -> None:
    flow, transport = _flow()
    flow.pause_for_queue()
    flow.resume_for_peer()  # a peer catching up that never held this edge back (a stale resume_writing)
    assert not transport.reading
    flow.resume_for_queue()
    flow.resume_for_queue()
    assert transport.reading and transport.calls == ["pause", "resume"]


def test_pausing_twice_for_one_reason_needs_one_resume() -> None:
    flow, transport = _flow()
    flow.pause_for_peer()
    flow.pause_for_peer()
    flow.resume_for_peer()
    assert transport.reading and transport.calls == ["pause", "resume"]


def test_a_closing_transport_is_neither_paused_nor_resumed() -> None:
    flow, transport = _flow()
    flow.pause_for_peer()
    transport.closing = True
    flow.resume_for_peer()
    flow.pause_for_queue()
    assert transport.calls == ["pause"] and flow.paused_by


def test_before_the_connection_is_made_there_is_nothing_to_pause() -> None:
    flow = FlowControl()
    flow.pause_for_queue()
    flow.resume_for_queue()
    assert not flow.paused_by
