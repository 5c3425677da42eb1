"""Incremental frame scanner for typed messages: walks 5-byte headers, streams bodies through, captures only the types asked for."""

from __future__ import annotations

import struct
from typing import NamedTuple

_HEADER = struct.Struct("!BI")
HEADER_SIZE = 5

# PostgreSQL itself refuses messages over 1 GiB (PQ_LARGE_MESSAGE_LIMIT); so do we.
MAX_MESSAGE_LENGTH = 1 << 30


class ProtocolViolation(ValueError):
    """The peer sent bytes that cannot be a valid message stream."""


class Frame(NamedTuple):
    """One whole captured message, header included (``data[0]`` is the type, the body starts at 5)."""

    kind: int
    data: bytes | memoryview


Segment = memoryview | bytes | Frame
"""What ``FrameScanner.feed`` yields: raw bytes to pass through as they are, or a captured Frame."""


class FrameScanner:
    """Finds message boundaries in a stream without building an object per message.

    Messages whose type is not in ``capture`` are never decoded: consecutive ones come back as one
    slice of the received chunk, and a body longer than the chunk streams through as it arrives, so
    a 1 GiB COPY row costs no more memory than the socket's read size. Captured messages come back
    whole, as a zero-copy slice when they fit in one chunk.
    """

    __slots__ = ("_capture", "_counted", "_max_length", "_remaining", "_partial", "_partial_total", "count")

    def __init__(self, capture: frozenset[int], max_length: int = MAX_MESSAGE_LENGTH,
                 counted: frozenset[int] = frozenset()) -> None:
        self._capture = capture
        self._counted = counted  # types only tallied in ``count`` as their headers pass, never assembled
        self.count = 0
        self._max_length = max_length
        self._remaining = 0  # body bytes still to stream through for a message not captured
        self._partial = bytearray()  # an incomplete header, or an incomplete captured message
        self._partial_total = 0  # size of the captured message being assembled; 0 while assembling a header

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at a message boundary."""
        return not self._remaining and not self._partial

    def _header(self, kind: int, length: int) -> int:
        if length < 4 or length > self._max_length:
            raise ProtocolViolation(f"invalid length {length} for message type {chr(kind)!r}")
        if kind in self._counted:
            self.count += 1
        return length + 1

    def feed(self, data: bytes) -> list[Segment]:
        out: list[Segment] = []
        view = memoryview(data)
        end = len(data)
        pos = run_start = 0
        if self._remaining:
            # The rest of a streamed body opens this chunk's pass-through run.
            pos = min(self._remaining, end)
            self._remaining -= pos
        elif self._partial:
            pos = run_start = self._continue_partial(view, out)
        capture = self._capture
        unpack = _HEADER.unpack_from
        while pos < end:
            if end - pos < HEADER_SIZE:
                if run_start < pos:
                    out.append(view[run_start:pos])
                self._partial += view[pos:]
                return out
            kind, length = unpack(data, pos)
            total = self._header(kind, length)
            if kind in capture:
                if run_start < pos:
                    out.append(view[run_start:pos])
                if pos + total <= end:
                    out.append(Frame(kind, view[pos:pos + total]))
                    pos += total
                    run_start = pos
                else:
                    self._partial += view[pos:]
                    self._partial_total = total
                    return out
            elif pos + total <= end:
                pos += total
            else:
                self._remaining = pos + total - end
                pos = end
        if run_start < end:
            out.append(view[run_start:end])
        return out

    def _continue_partial(self, view: memoryview, out: list[Segment]) -> int:
        """Complete a header or captured message split across reads; return how much of ``view`` it used."""
        partial = self._partial
        pos = 0
        if not self._partial_total:
            pos = min(HEADER_SIZE - len(partial), len(view))
            partial += view[:pos]
            if len(partial) < HEADER_SIZE:
                return pos
            kind, length = _HEADER.unpack_from(partial, 0)
            total = self._header(kind, length)
            if kind not in self._capture:
                # Stream this message: its header goes out now, its body as it arrives.
                out.append(bytes(partial))
                partial.clear()
                body = total - HEADER_SIZE
                take = min(body, len(view) - pos)
                if take:
                    out.append(view[pos:pos + take])
                self._remaining = body - take
                return pos + take
            self._partial_total = total
        take = min(self._partial_total - len(partial), len(view) - pos)
        partial += view[pos:pos + take]
        pos += take
        if len(partial) == self._partial_total:
            out.append(Frame(partial[0], bytes(partial)))
            partial.clear()
            self._partial_total = 0
        return pos
