"""FlowControl: whether one edge's transport is read, and for which reasons it is not."""

from __future__ import annotations

import asyncio
from typing import Final

# Why reading is paused; each reason is lifted only by its own resume.
_PEER: Final = 1  # the peer's write buffer passed its high-water mark (backpressure)
_QUEUE: Final = 2  # this edge holds too much it has read and not passed on yet


class FlowControl:
    """Pauses and resumes reading one transport, for the peer's sake or for this edge's own queue.

    A reason is lifted only by its own resume: the peer catching up must not restart reading while
    this edge's queue is still full, nor the queue emptying while the peer is still behind. The
    reasons are bits of one int, so that the relay's checks stay native attribute reads.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None  # set once connected (and again after a TLS upgrade)
        self.paused_by = 0  # the reasons, as bits; 0: reading
        # This transport's write buffer is past its high-water mark (pause_writing came, resume_writing not
        # yet): a peer linked meanwhile must start paused, as the transport will not say it again.
        self.write_paused = False

    def pause_for_peer(self) -> None:
        self._pause(_PEER)

    def resume_for_peer(self) -> None:
        self._resume(_PEER)

    def pause_for_queue(self) -> None:
        self._pause(_QUEUE)

    def resume_for_queue(self) -> None:
        self._resume(_QUEUE)

    def _pause(self, reason: int) -> None:
        was_reading = not self.paused_by
        self.paused_by |= reason
        transport = self.transport
        if was_reading and transport is not None and not transport.is_closing():
            transport.pause_reading()

    def _resume(self, reason: int) -> None:
        if not self.paused_by & reason:
            return
        self.paused_by &= ~reason
        transport = self.transport
        if not self.paused_by and transport is not None and not transport.is_closing():
            transport.resume_reading()
