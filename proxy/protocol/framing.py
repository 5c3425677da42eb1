"""Incremental frame scanner for typed messages: walks 5-byte headers, streams bodies through, captures only the types asked for."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import NamedTuple

_HEADER = struct.Struct("!BI")
HEADER_SIZE = 5

# PostgreSQL itself refuses messages over 1 GiB (PQ_LARGE_MESSAGE_LIMIT); so do we.
MAX_MESSAGE_LENGTH = 1 << 30


class ProtocolViolation(ValueError):
    """The peer sent bytes that cannot be a valid message stream."""


class BufferLimitExceeded(ValueError):
    """A message the consumer must see whole is larger than the scanner may hold for it."""

    def __init__(self, kind: int, size: int, limit: int) -> None:
        super().__init__(f"message of type {chr(kind)!r} is {size} bytes, over the {limit} the scanner may hold")
        self.kind = kind
        self.size = size
        self.limit = limit


class Frame(NamedTuple):
    """One captured message, header included (``data[0]`` is the type, the body starts at 5).

    Whole, or only its head when it is too large to hold (see FrameScanner): its header still says
    the whole length, and the rest follows as pass-through bytes.
    """

    kind: int
    data: bytes | memoryview


def is_whole(message: bytes | memoryview) -> bool:
    """False for the head of a captured message too large to hold, whose rest streams on behind it."""
    return len(message) == _HEADER.unpack_from(message)[1] + 1


# tuple.__new__ builds a Frame without the Python-level __new__ NamedTuple generates: this runs
# for every captured message, so it is a measurable share of the scanner's cost.
_new_tuple = tuple.__new__

Segment = memoryview | bytes | Frame
"""What ``FrameScanner.feed`` yields: raw bytes to pass through as they are, or a captured Frame."""

# Per message type, one byte of flags: what the walk does when it meets a header of that type.
CAPTURE, COUNTED, NEUTRAL = 1, 2, 4
# Where a walk over one chunk stopped (the C walk in _scanner.c returns the same numbers).
WALK_DONE, WALK_HEADER_SPLIT, WALK_CAPTURE_SPLIT, WALK_BODY_SPLIT, WALK_INVALID = range(5)
WalkResult = tuple[int, int, int, int, int, int]
"""(status, pos, run_start, messages counted, mid_batch as -1 unchanged / 0 / 1, total size of the
message the walk stopped at, or 0)."""


def walk_python(data: bytes, view: memoryview, pos: int, run_start: int, flags: bytes, max_length: int,
                frame_type: type[Frame], out: list[Segment]) -> WalkResult:
    """Walk the whole messages of one chunk from ``pos``, appending pass-through runs and Frames to ``out``.

    The reference for (and fallback to) the compiled walk in ``_scanner.c``: the hot loop of every
    read pgmux relays. It stops at the chunk's end or where the caller must decide something.
    """
    end = len(data)
    unpack = _HEADER.unpack_from
    counted = 0
    mid_batch = -1
    while pos < end:
        if end - pos < HEADER_SIZE:
            return WALK_HEADER_SPLIT, pos, run_start, counted, mid_batch, 0
        kind, length = unpack(data, pos)
        if length < 4 or length > max_length:
            return WALK_INVALID, pos, run_start, counted, mid_batch, 0
        flag = flags[kind]
        if flag & COUNTED:
            counted += 1
            mid_batch = 0
        elif not flag & NEUTRAL:
            mid_batch = 1
        total = length + 1
        if flag & CAPTURE:
            if run_start < pos:
                out.append(view[run_start:pos])
            run_start = pos
            if pos + total > end:
                return WALK_CAPTURE_SPLIT, pos, run_start, counted, mid_batch, total
            out.append(_new_tuple(frame_type, (kind, view[pos:pos + total])))
            pos += total
            run_start = pos
        elif pos + total <= end:
            pos += total
        else:
            return WALK_BODY_SPLIT, pos, run_start, counted, mid_batch, total
    return WALK_DONE, pos, run_start, counted, mid_batch, 0


try:
    from proxy.protocol._scanner import walk as walk_compiled  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:  # not built (no C compiler at install time): the same walk in Python
    walk_compiled = None

WALKS = {"python": walk_python, **({"compiled": walk_compiled} if walk_compiled is not None else {})}
_walk = walk_compiled or walk_python


@functools.lru_cache(maxsize=64)
def kind_flags(capture: frozenset[int], counted: frozenset[int], neutral: frozenset[int]) -> bytes:
    """The 256-byte table a walk reads: CAPTURE, COUNTED and NEUTRAL bits per message type.

    Cached: every connection builds two scanners from the same few sets, and building one costs
    more than a whole transaction's relay.
    """
    return bytes((CAPTURE if kind in capture else 0) | (COUNTED if kind in counted else 0)
                 | (NEUTRAL if kind in neutral else 0) for kind in range(256))


class FrameScanner:
    """Finds message boundaries in a stream without building an object per message.

    Messages whose type is not in ``capture`` are never decoded: consecutive ones come back as one
    slice of the received chunk, and a body longer than the chunk streams through as it arrives, so
    a 1 GiB COPY row costs no more memory than the socket's read size. Captured messages come back
    whole, as a zero-copy slice when they fit in one chunk.

    With a ``head_limit``, a captured message larger than that which does not fit in one chunk is
    not held whole: its first ``head_limit`` bytes come back as a Frame (its head, see ``is_whole``)
    and the rest streams through as it arrives, unless ``keep_whole(head)`` says the consumer needs
    all of it; such a message is then held whole if it is at most ``max_whole`` bytes, and refused
    with BufferLimitExceeded (as soon as its head is here) otherwise.

    Types in ``counted`` (the batch ends: Sync, Query, FunctionCall) are only tallied in ``count``
    as their headers pass. ``mid_batch`` tells whether a message has begun since the last batch end,
    i.e. whether the server has been sent part of a request it has not been asked to answer yet;
    types in ``neutral`` (COPY data) neither open nor close a batch.
    """

    __slots__ = ("_flags", "_max_length", "_remaining", "_partial", "_partial_total", "_message_total",
                 "_head_limit", "_keep_whole", "_max_whole", "count", "mid_batch", "verbatim")

    def __init__(self, capture: frozenset[int], max_length: int = MAX_MESSAGE_LENGTH,
                 counted: frozenset[int] = frozenset(), neutral: frozenset[int] = frozenset(),
                 head_limit: int = 0, keep_whole: Callable[[Frame], bool] | None = None,
                 max_whole: int = MAX_MESSAGE_LENGTH) -> None:
        self._flags = kind_flags(capture, counted, neutral)
        self._max_length = max_length
        self._remaining = 0  # body bytes still to stream through for a message not held
        # An incomplete header, or an incomplete captured message or head; None, not an empty buffer, when
        # there is none: a scanner at a boundary (an idle client's) holds no buffer.
        self._partial: bytearray | None = None
        self._partial_total = 0  # bytes to hold of the captured message being assembled; 0 while assembling a header
        self._message_total = 0  # size of that whole message: more than _partial_total while holding only its head
        self._head_limit = head_limit  # 0: captured messages always come back whole
        self._keep_whole = keep_whole
        self._max_whole = max_whole
        self.count = 0
        self.mid_batch = False
        self.verbatim = True  # the last feed's segments are exactly the bytes it was fed, nothing held

    def set_flags(self, flags: bytes) -> None:
        """Look at other message types from the next feed on (``flags``: from kind_flags)."""
        self._flags = flags

    @property
    def holding(self) -> bool:
        """True while bytes fed are held back (a split header or captured message): the segments
        returned are then not the bytes fed, and a caller must forward segments, not raw reads."""
        return self._partial is not None

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at a message boundary."""
        return not self._remaining and self._partial is None

    def release_held(self) -> bytes:
        """Hand back the bytes held for an incomplete message (another scanner takes over the stream)."""
        held, self._partial = self._partial, None
        self._partial_total = self._message_total = 0
        return bytes(held) if held is not None else b""

    @property
    def progress(self) -> int:
        """Grows as more of an unfinished message arrives: lets a timer tell a stalled sender from a
        slow one without the relay keeping a clock."""
        return (len(self._partial) if self._partial is not None else 0) - self._remaining

    @property
    def at_rest(self) -> bool:
        """True at a batch boundary: no message begun since the last batch end, none half-fed."""
        return not self.mid_batch and self.at_boundary

    def passed(self, batch_ends: int, mid_batch: int) -> None:
        """Whole messages went by without being fed (the compiled relay sent them on, see proxy/_relay.c):
        count them as feed would. ``mid_batch``: as walk returns it (-1: only neutral messages)."""
        self.count += batch_ends
        if mid_batch >= 0:
            self.mid_batch = mid_batch == 1
        self.verbatim = True

    def _check(self, kind: int, length: int) -> None:
        if length < 4 or length > self._max_length:
            raise ProtocolViolation(f"invalid length {length} for message type {chr(kind)!r}")

    def _note(self, flag: int) -> None:
        if flag & COUNTED:
            self.count += 1
            self.mid_batch = False
        elif not flag & NEUTRAL:
            self.mid_batch = True

    def feed(self, data: bytes) -> list[Segment]:
        end = len(data)
        if end >= HEADER_SIZE and not self._remaining and self._partial is None:
            # The common case first: a read that holds exactly one whole message.
            kind, length = _HEADER.unpack_from(data, 0)
            if length + 1 == end and 4 <= length <= self._max_length:
                flag = self._flags[kind]
                self._note(flag)
                self.verbatim = True
                return [_new_tuple(Frame, (kind, data))] if flag & CAPTURE else [data]
        self.verbatim = False  # until proven otherwise below
        out: list[Segment] = []
        view = memoryview(data)
        pos = run_start = 0
        intact = self._partial is None
        if self._remaining:
            # The rest of a streamed body opens this chunk's pass-through run.
            pos = min(self._remaining, end)
            self._remaining -= pos
        elif not intact:
            pos = run_start = self._continue_partial(view, out)
        status, pos, run_start, counted, mid_batch, total = _walk(
            data, view, pos, run_start, self._flags, self._max_length, Frame, out)
        if counted:
            self.count += counted
        if mid_batch >= 0:
            self.mid_batch = mid_batch == 1
        if status == WALK_DONE or status == WALK_BODY_SPLIT:
            if status == WALK_BODY_SPLIT:
                self._remaining = pos + total - end  # the body streams through as it arrives
            if run_start < end:
                out.append(view[run_start:end])
            self.verbatim = intact
            return out
        if status == WALK_INVALID:
            self._check(*_HEADER.unpack_from(data, pos))
        if run_start < pos:
            out.append(view[run_start:pos])
        if status == WALK_HEADER_SPLIT:
            self._partial = bytearray(view[pos:])
        else:  # a captured message to assemble, or the head of one
            self._start_capture(total)
            self._collect(view, pos, out)
        return out

    def _continue_partial(self, view: memoryview, out: list[Segment]) -> int:
        """Complete a header or captured message split across reads; return how much of ``view`` it used."""
        partial = self._partial
        assert partial is not None
        pos = 0
        if not self._partial_total:
            pos = min(HEADER_SIZE - len(partial), len(view))
            partial += view[:pos]
            if len(partial) < HEADER_SIZE:
                return pos
            kind, length = _HEADER.unpack_from(partial, 0)
            self._check(kind, length)
            flag = self._flags[kind]
            self._note(flag)
            total = length + 1
            if not flag & CAPTURE:
                # Stream this message: its header goes out now, its body as it arrives.
                out.append(bytes(partial))
                self._partial = None
                body = total - HEADER_SIZE
                take = min(body, len(view) - pos)
                if take:
                    out.append(view[pos:pos + take])
                self._remaining = body - take
                return pos + take
            self._start_capture(total)
        return self._collect(view, pos, out)

    def _start_capture(self, total: int) -> None:
        """A captured message of ``total`` bytes begins: hold it whole, or first only its head."""
        self._message_total = total
        self._partial_total = self._head_limit if total > self._head_limit > 0 else total

    def _collect(self, view: memoryview, pos: int, out: list[Segment]) -> int:
        """Hold the captured message's bytes from ``view[pos:]``; pass it on once whole, or its head once
        that is here (then stream its rest through). Return how far into ``view`` it went."""
        partial = self._partial
        if partial is None:
            partial = self._partial = bytearray()
        take = min(self._partial_total - len(partial), len(view) - pos)
        partial += view[pos:pos + take]
        pos += take
        if len(partial) < self._partial_total:
            return pos
        if self._partial_total == self._message_total:
            out.append(Frame(partial[0], bytes(partial)))
            self._partial = None
            self._partial_total = self._message_total = 0
            return pos
        head = Frame(partial[0], bytes(partial))
        if self._keep_whole is not None and self._keep_whole(head):
            if self._message_total > self._max_whole:
                raise BufferLimitExceeded(head.kind, self._message_total, self._max_whole)
            self._partial_total = self._message_total
            return self._collect(view, pos, out)
        out.append(head)
        self._partial = None
        body = self._message_total - self._partial_total  # the rest streams through as it arrives
        self._partial_total = self._message_total = 0
        take = min(body, len(view) - pos)
        if take:
            out.append(view[pos:pos + take])
        self._remaining = body - take
        return pos + take


class BatchSkipper:
    """Discards a message stream up to the end of the first message of some types, holding at most a split header.

    For a refused request: its bytes are dropped as they arrive, however large, until its batch ends.
    """

    __slots__ = ("_kinds", "_header", "_remaining", "kind")

    def __init__(self, kinds: frozenset[int]) -> None:
        self._kinds = kinds
        self._header = bytearray()  # a header split across reads
        self._remaining = 0  # body bytes of the current message still to discard
        self.kind = 0  # the type of the current message; once the skip ended, the type it ended with

    def feed(self, data: bytes) -> int | None:
        """Discard ``data`` up to the end of the first message of one of the types; return the offset just
        past it, or None when all of ``data`` was discarded and the end is still to come."""
        header = self._header
        pos = 0
        end = len(data)
        while True:
            if self._remaining:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining:
                    return None
                if self.kind in self._kinds:
                    return pos
            if pos == end:
                return None
            take = min(HEADER_SIZE - len(header), end - pos)
            header += data[pos:pos + take]
            pos += take
            if len(header) < HEADER_SIZE:
                return None
            kind, length = _HEADER.unpack_from(header)
            header.clear()
            if length < 4 or length > MAX_MESSAGE_LENGTH:
                raise ProtocolViolation(f"invalid length {length} for message type {chr(kind)!r}")
            self.kind = kind
            self._remaining = length - 4
            if not self._remaining and kind in self._kinds:
                return pos
