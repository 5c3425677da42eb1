"""FrameScanner: fed bytes at every split point and fuzzed, once per walk (the compiled one and the pure-Python one)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import framing
from proxy.protocol import messages as m
from proxy.protocol.framing import MAX_MESSAGE_LENGTH, Frame, FrameScanner, ProtocolViolation
from proxy.server import _RELAY_CAPTURE, _relayed_as_read

FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, params=sorted(framing.WALKS))
def walk(request, monkeypatch) -> str:
    """Every test here runs with each walk this machine has: they must be indistinguishable."""
    monkeypatch.setattr(framing, "_walk", framing.WALKS[request.param])
    return request.param


def msg(kind: str, body: bytes = b"") -> bytes:
    return m.message(ord(kind), body)


def scan(scanner: FrameScanner, chunks: list[bytes]) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Feed the chunks; return every byte that came out (in order) and the captured frames."""
    out = bytearray()
    frames: list[tuple[int, bytes]] = []
    for chunk in chunks:
        came_out = bytearray()
        for segment in scanner.feed(chunk):
            if type(segment) is Frame:
                data = bytes(segment.data)
                assert segment.kind == data[0]
                assert len(data) == struct.unpack_from("!I", data, 1)[0] + 1
                frames.append((segment.kind, data))
                came_out += data
            else:
                came_out += bytes(segment)
        if scanner.verbatim:
            # The relay's fast path forwards the chunk itself when this holds.
            assert came_out == chunk
        out += came_out
    return bytes(out), frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


# A stream a client might send in transaction mode: extended protocol, simple query, COPY, Terminate.
CLIENT_STREAM = b"".join([
    msg("P", b"s1\x00SELECT $1\x00\x00\x00"),
    msg("B", b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00"),
    msg("E", b"\x00\x00\x00\x00\x00"),
    msg("S"),
    msg("Q", b"SELECT 1; SELECT 2\x00"),
    msg("H"),
    msg("d", b"x" * 300),
    msg("c"),
    msg("S"),
    msg("F", b"\x00\x00\x00\x01"),
    msg("X"),
])
CAPTURE = frozenset({m.TERMINATE, m.QUERY})
COUNTED = frozenset({m.SYNC, m.QUERY, m.FUNCTION_CALL})
EXPECTED_FRAMES = [(m.QUERY, msg("Q", b"SELECT 1; SELECT 2\x00")), (m.TERMINATE, msg("X"))]
EXPECTED_COUNT = 4  # two Syncs, one Query, one FunctionCall


# ---- FrameScanner -------------------------------------------------------------------------------

def test_whole_stream_passes_through_with_the_asked_for_frames() -> None:
    scanner = FrameScanner(CAPTURE, counted=COUNTED)
    out, frames = scan(scanner, [CLIENT_STREAM])
    assert out == CLIENT_STREAM
    assert frames == EXPECTED_FRAMES
    assert scanner.count == EXPECTED_COUNT
    assert scanner.at_boundary


def test_every_single_split_point_gives_the_same_bytes_frames_and_count() -> None:
    for cut in range(len(CLIENT_STREAM) + 1):
        scanner = FrameScanner(CAPTURE, counted=COUNTED)
        out, frames = scan(scanner, [CLIENT_STREAM[:cut], CLIENT_STREAM[cut:]])
        assert out == CLIENT_STREAM, cut
        assert frames == EXPECTED_FRAMES, cut
        assert scanner.count == EXPECTED_COUNT, cut
        assert scanner.at_boundary, cut


def test_every_pair_of_split_points_gives_the_same_result() -> None:
    stream = b"".join([msg("S"), msg("Q", b"SELECT 1\x00"), msg("d", b"abcdefgh"), msg("S"), msg("X")])
    capture = frozenset({m.QUERY, m.TERMINATE, m.SYNC})
    expected_frames = [(d[0], d) for d in (msg("S"), msg("Q", b"SELECT 1\x00"), msg("S"), msg("X"))]
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            scanner = FrameScanner(capture, counted=COUNTED)
            chunks = [stream[:first], stream[first:second], stream[second:]]
            out, frames = scan(scanner, chunks)
            assert out == stream, (first, second)
            assert frames == expected_frames, (first, second)
            assert scanner.count == 3, (first, second)  # Sync, Query, Sync: counted once each


def test_one_byte_at_a_time() -> None:
    scanner = FrameScanner(CAPTURE, counted=COUNTED)
    out, frames = scan(scanner, [CLIENT_STREAM[i:i + 1] for i in range(len(CLIENT_STREAM))])
    assert (out, frames, scanner.count) == (CLIENT_STREAM, EXPECTED_FRAMES, EXPECTED_COUNT)


def test_empty_feeds_change_nothing() -> None:
    scanner = FrameScanner(CAPTURE, counted=COUNTED)
    chunks = []
    for i in range(0, len(CLIENT_STREAM), 7):
        chunks += [b"", CLIENT_STREAM[i:i + 7], b""]
    out, frames = scan(scanner, chunks)
    assert (out, frames, scanner.count) == (CLIENT_STREAM, EXPECTED_FRAMES, EXPECTED_COUNT)


def test_verbatim_is_false_while_bytes_are_held_or_released() -> None:
    query = msg("Q", b"SELECT 1\x00")
    scanner = FrameScanner(frozenset({ord("Q")}))
    scanner.feed(query[:3])
    assert not scanner.verbatim  # a split header is held back
    scanner.feed(query[3:] + query[:7])
    assert not scanner.verbatim  # the held header comes out in front of this chunk's bytes
    scanner.feed(query[7:])
    assert not scanner.verbatim
    scanner.feed(query + query)
    assert scanner.verbatim
    scanner.feed(query)
    assert scanner.verbatim


def test_at_boundary_is_false_inside_a_header_or_body() -> None:
    scanner = FrameScanner(frozenset({m.QUERY}))
    query = msg("Q", b"SELECT 1\x00")
    copy = msg("d", b"abc")
    scanner.feed(query[:3])
    assert not scanner.at_boundary  # inside a header
    scanner.feed(query[3:8])
    assert not scanner.at_boundary  # inside a captured body
    scanner.feed(query[8:] + copy[:6])
    assert not scanner.at_boundary  # inside a streamed body
    scanner.feed(copy[6:])
    assert scanner.at_boundary


def test_uncaptured_messages_come_back_as_one_slice_per_chunk() -> None:
    rows = b"".join(msg("D", b"\x00\x01\x00\x00\x00\x01x") for _ in range(200))
    segments = FrameScanner(frozenset({m.READY_FOR_QUERY})).feed(rows)
    assert len(segments) == 1
    assert bytes(segments[0]) == rows


def test_a_large_body_streams_through_without_being_buffered() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    message = msg("d", body)
    scanner = FrameScanner(frozenset({m.QUERY}))
    chunk_size = 65536
    for start in range(0, len(message), chunk_size):
        chunk = message[start:start + chunk_size]
        segments = scanner.feed(chunk)
        # Everything that arrived goes out at once, except a header still incomplete.
        assert b"".join(bytes(s) for s in segments) == chunk
        assert not any(type(s) is Frame for s in segments)
    assert scanner.at_boundary


def test_captured_frame_split_across_chunks_is_reassembled_whole() -> None:
    big = msg("Q", b"SELECT '" + b"z" * 5000 + b"'\x00")
    scanner = FrameScanner(frozenset({m.QUERY}))
    out, frames = scan(scanner, [big[i:i + 1000] for i in range(0, len(big), 1000)])
    assert out == big and frames == [(m.QUERY, big)]


def test_a_type_both_captured_and_counted_is_counted_once() -> None:
    stream = msg("S") * 3 + msg("Q", b"x\x00")
    for cut in range(len(stream) + 1):
        scanner = FrameScanner(frozenset({m.SYNC}), counted=frozenset({m.SYNC, m.QUERY}))
        _, frames = scan(scanner, [stream[:cut], stream[cut:]])
        assert scanner.count == 4
        assert len(frames) == 3


@pytest.mark.parametrize("length", [0, 1, 2, 3, MAX_MESSAGE_LENGTH + 1, 0xFFFFFFFF, 0x80000000])
def test_invalid_length_is_a_protocol_violation(length: int) -> None:
    header = b"Q" + struct.pack("!I", length)
    for capture in (frozenset(), frozenset({m.QUERY})):
        with pytest.raises(ProtocolViolation, match=f"invalid length {length}"):
            FrameScanner(capture).feed(header)
        # The same when the bad header is split, or arrives after a valid message.
        for cut in range(1, len(header)):
            scanner = FrameScanner(capture)
            scanner.feed(msg("S") + header[:cut])
            with pytest.raises(ProtocolViolation):
                scanner.feed(header[cut:])


def test_length_limit_is_inclusive_and_configurable() -> None:
    header = b"d" + struct.pack("!I", MAX_MESSAGE_LENGTH)
    assert bytes(FrameScanner(frozenset()).feed(header)[0]) == header  # exactly 1 GiB is allowed
    scanner = FrameScanner(frozenset(range(256)), max_length=100)
    scanner.feed(msg("p", b"a" * 96))  # length 100
    with pytest.raises(ProtocolViolation):
        scanner.feed(msg("p", b"a" * 97))


def test_minimal_message_of_length_four_is_valid() -> None:
    for kind in (m.SYNC, m.FLUSH, m.TERMINATE):
        scanner = FrameScanner(frozenset({kind}), counted=frozenset({kind}))
        out, frames = scan(scanner, [bytes([kind]) + b"\x00\x00\x00\x04"])
        assert frames == [(kind, bytes([kind]) + b"\x00\x00\x00\x04")] and scanner.count == 1


# ---- FrameScanner properties -------------------------------------------------------------------

_kinds = st.sampled_from(sorted({ord(c) for c in "PBEDSCQHFdcfXpZTNK123A"}))
_messages = st.lists(st.tuples(_kinds, st.binary(max_size=40)), max_size=12)
_capture_sets = st.frozensets(_kinds, max_size=6)
_cuts = st.lists(st.integers(min_value=0, max_value=600), max_size=8)


@FUZZ
@given(items=_messages, capture=_capture_sets, counted=_capture_sets, cuts=_cuts)
def test_property_valid_streams_scan_the_same_at_any_split(items, capture, counted, cuts) -> None:
    stream = b"".join(m.message(kind, body) for kind, body in items)
    scanner = FrameScanner(capture, counted=counted)
    out, frames = scan(scanner, split_at(stream, cuts))
    assert out == stream
    assert frames == [(kind, m.message(kind, body)) for kind, body in items if kind in capture]
    assert scanner.count == sum(1 for kind, _ in items if kind in counted)
    assert scanner.at_boundary


@st.composite
def _noisy_streams(draw) -> bytes:
    """A valid message stream with a few bytes overwritten and maybe cut short: mostly-plausible headers."""
    data = bytearray(b"".join(m.message(kind, body) for kind, body in draw(_messages)))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _noisy_streams()), capture=_capture_sets, cuts=_cuts,
       max_length=st.sampled_from([MAX_MESSAGE_LENGTH, 1 << 16, 64]))
def test_property_random_bytes_raise_only_protocol_violation(data, capture, cuts, max_length) -> None:
    def run(chunks: list[bytes]):
        scanner = FrameScanner(capture, max_length=max_length, counted=capture)
        try:
            return scan(scanner, chunks), scanner.count, scanner.at_boundary
        except ProtocolViolation:
            return None

    whole = run([data])
    pieces = run(split_at(data, cuts))
    # Splitting never changes the verdict, the bytes, the frames or the count.
    assert whole == pieces
    if whole is not None:
        (out, _frames), _count, at_boundary = whole
        # Bytes come out in order; only an incomplete header or captured message is held back.
        assert data.startswith(out)
        if at_boundary:
            assert out == data




# ---- captured messages too large to hold: a head, then the rest streams through ---------------

def scan_heads(scanner: FrameScanner, chunks: list[bytes]) -> tuple[bytes, list[bytes], list[list[bytes]]]:
    """Feed the chunks; return every byte that came out, the captured frames (whole or heads) and
    what each feed returned."""
    out = bytearray()
    frames: list[bytes] = []
    per_feed: list[list[bytes]] = []
    for chunk in chunks:
        segments = scanner.feed(chunk)
        per_feed.append([bytes(s.data) if type(s) is Frame else bytes(s) for s in segments])
        for segment in segments:
            if type(segment) is Frame:
                assert segment.kind == segment.data[0]
                frames.append(bytes(segment.data))
        out += b"".join(per_feed[-1])
    return bytes(out), frames, per_feed


def test_a_captured_message_over_the_head_limit_streams_on_after_its_head() -> None:
    query = msg("Q", b"SELECT '" + b"x" * 300_000 + b"'\x00")
    scanner = FrameScanner(frozenset({m.QUERY}), counted=COUNTED, head_limit=1000)
    chunks = [query[i:i + 65536] for i in range(0, len(query), 65536)]
    out, frames, per_feed = scan_heads(scanner, chunks)
    # Nothing is held past a feed: every chunk comes out as it went in, its head as a Frame.
    assert [b"".join(fed) for fed in per_feed] == chunks
    assert frames == [query[:1000]] and out == query
    assert not framing.is_whole(frames[0])
    assert scanner.count == 1 and scanner.at_boundary


def test_a_head_split_across_reads_is_held_only_until_it_is_complete() -> None:
    bind = msg("B", b"portal\x00stmt\x00" + b"p" * 5000)
    scanner = FrameScanner(frozenset({m.BIND}), head_limit=1000)
    out, frames, per_feed = scan_heads(scanner, [bind[i:i + 300] for i in range(0, len(bind), 300)])
    assert per_feed[:3] == [[], [], []]  # 900 bytes: the head is not complete yet
    assert per_feed[3] == [bind[:1000], bind[1000:1200]]
    assert all(b"".join(fed) == bind[i * 300:(i + 1) * 300] for i, fed in enumerate(per_feed) if i > 3)
    assert frames == [bind[:1000]] and out == bind and scanner.at_boundary


def test_small_captured_messages_and_ones_within_a_chunk_stay_whole_with_a_head_limit() -> None:
    small = msg("Q", b"SELECT 1\x00")
    large = msg("Q", b"x" * 5000 + b"\x00")
    for chunks in ([small + large], [small[:3], small[3:] + large]):
        _, frames, _ = scan_heads(FrameScanner(frozenset({m.QUERY}), head_limit=1000), chunks)
        assert frames == [small, large]  # the large one arrived in one read: a slice of it, no copy
        assert all(framing.is_whole(frame) for frame in frames)


def test_keep_whole_holds_what_the_consumer_asks_for_up_to_max_whole() -> None:
    named = msg("P", b"s1\x00SELECT '" + b"y" * 5000 + b"'\x00\x00\x00")
    unnamed = msg("P", b"\x00SELECT '" + b"y" * 5000 + b"'\x00\x00\x00")
    stream = named + unnamed
    seen: list[bytes] = []

    def named_parse(head: Frame) -> bool:
        seen.append(bytes(head.data))
        return head.data[5] != 0

    chunks = [stream[i:i + 700] for i in range(0, len(stream), 700)]
    scanner = FrameScanner(frozenset({m.PARSE}), head_limit=1000, keep_whole=named_parse, max_whole=len(named))
    out, frames, _ = scan_heads(scanner, chunks)
    assert out == stream and frames == [named, unnamed[:1000]]
    assert seen == [named[:1000], unnamed[:1000]]  # asked once per message, with its head
    # One byte over max_whole: refused as soon as the head is here, long before the rest arrives.
    scanner = FrameScanner(frozenset({m.PARSE}), head_limit=1000, keep_whole=named_parse, max_whole=len(named) - 1)
    scanner.feed(chunks[0])
    with pytest.raises(framing.BufferLimitExceeded) as refused:
        scanner.feed(chunks[1])
    assert (refused.value.kind, refused.value.size, refused.value.limit) == (m.PARSE, len(named), len(named) - 1)


_head_limits = st.sampled_from([0, 6, 16, 64])


@FUZZ
@given(items=st.lists(st.tuples(_kinds, st.binary(max_size=120)), max_size=10), capture=_capture_sets,
       keep=_capture_sets, counted=_capture_sets, head_limit=_head_limits, cuts=_cuts)
def test_property_heads_and_streamed_rests_give_back_every_byte(items, capture, keep, counted, head_limit,
                                                              cuts) -> None:
    stream = b"".join(m.message(kind, body) for kind, body in items)
    scanner = FrameScanner(capture, counted=counted, head_limit=head_limit, keep_whole=lambda head: head.kind in keep)
    out, frames, _ = scan_heads(scanner, split_at(stream, cuts))
    assert out == stream
    expected = [m.message(kind, body) for kind, body in items if kind in capture]
    assert len(frames) == len(expected)
    for frame, whole in zip(frames, expected):
        if frame != whole:
            # Only a message too large to hold that the consumer did not ask for whole comes as a head.
            assert 0 < head_limit < len(whole) and whole[0] not in keep and frame == whole[:head_limit]
    assert scanner.count == sum(1 for kind, _ in items if kind in counted)
    assert scanner.at_boundary


# ---- BatchSkipper -------------------------------------------------------------------------------

_ENDS = frozenset({m.SYNC, m.QUERY, m.FUNCTION_CALL, m.TERMINATE})


@FUZZ
@given(items=_messages, tail=st.binary(max_size=30), tail_cut=st.integers(0, 40), cuts=_cuts)
def test_property_batch_skipper_stops_just_past_the_first_batch_end(items, tail, tail_cut, cuts) -> None:
    # Behind the messages, maybe the start of one more that is still arriving.
    stream = b"".join(m.message(kind, body) for kind, body in items) + m.message(m.COPY_DATA, tail)[:tail_cut]
    expected, pos = None, 0
    for kind, body in items:
        pos += 5 + len(body)
        if kind in _ENDS:
            expected = (pos, kind)
            break
    skipper = framing.BatchSkipper(_ENDS)
    offset, found = 0, None
    for chunk in split_at(stream, cuts):
        end = skipper.feed(chunk)
        if end is not None:
            found = (offset + end, skipper.kind)
            break
        offset += len(chunk)
    if expected is None:
        assert found is None
    else:
        assert found == expected


def test_batch_skipper_holds_nothing_of_a_huge_message() -> None:
    skipper = framing.BatchSkipper(_ENDS)
    bind = msg("B", b"\x00\x00" + b"z" * 3_000_000)
    for start in range(0, len(bind), 65536):
        assert skipper.feed(bind[start:start + 65536]) is None
    assert skipper.feed(msg("S") + msg("Q", b"SELECT 1\x00")) == 5 and skipper.kind == m.SYNC
    with pytest.raises(ProtocolViolation, match="invalid length 3"):
        framing.BatchSkipper(_ENDS).feed(b"S\x00\x00\x00\x03")


def test_capturing_notifications_leaves_ordinary_server_answers_relayed_as_read() -> None:
    # The server relay captures NotificationResponse (to give it its sender's pid): an answer without one
    # must still come back as one pass-through run and its ReadyForQuery, written to the client unchanged.
    scanner = FrameScanner(_RELAY_CAPTURE)
    rows = m.row_description([("n", 23)]) + m.data_row(["1"]) * 3 + m.command_complete("SELECT 3")
    answer = rows + m.ready_for_query()
    segments = scanner.feed(answer)
    assert scanner.verbatim and len(segments) == 2 and bytes(segments[0]) == rows
    assert segments[1] == Frame(m.READY_FOR_QUERY, m.ready_for_query())
    assert _relayed_as_read(segments)
    notification = msg("A", struct.pack("!i", 4242) + b"chan\x00payload\x00")
    for read in (notification, rows + notification + m.ready_for_query()):
        segments = scanner.feed(read)
        assert Frame(m.NOTIFICATION_RESPONSE, notification) in segments
        assert not _relayed_as_read(segments)  # relayed segment by segment, its pid looked at
