"""Named prepared statements in transaction mode: client names map to shared server statements, re-prepared on demand.

A client's ``Parse("s1", text, types)`` becomes a server statement named after a hash of (text,
types), so identical statements from different clients share one statement per server. Each
server keeps an LRU of the statements it holds. Before a Bind or Describe that names a statement
the linked server lacks, pgmux injects the Parse; the server's ParseComplete for it is swallowed.
Responses are never synthesised: a client Parse of a statement the server already has becomes an
unnamed Parse (answered by a real ParseComplete), and a client Close becomes a Close of a name no
server holds (answered by a real CloseComplete), so every reply stays in its place in the stream.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

from proxy.protocol import messages as m
from proxy.protocol.framing import Frame, ProtocolViolation, Segment, is_whole
from proxy.protocol.sql_words import drops_all_statements, mentions_session_state, mentions_statement_drop, session_effects
from proxy.stats import PreparedCounters

_ABSENT_STATEMENT = b"pgmux_no_such_statement\x00"  # Close of a missing statement is no error
_INT16 = struct.Struct("!h")
_TYPED_HEADER = struct.Struct("!BI")
_WHITESPACE = b" \t\n\r\x0b\x0c"
# The most non-whitespace bytes of a statement that drops_all_statements recognises without comments.
_RESET_ALL_LONGEST = len(b"DEALLOCATEPREPAREALL;")
_NO_PATHS: Final[frozenset[str]] = frozenset()


@dataclass(frozen=True, slots=True)
class Statement:
    server_name: bytes  # NUL-terminated, as it goes on the wire
    parse: bytes  # the whole Parse message that creates it on a server
    may_drop_statements: bool  # its text mentions DEALLOCATE or DISCARD: running it may empty the server
    session_sql: bytes | None  # its text, when running it may change the session's state (SET, set_config...)
    search_path: str  # the search_path it was named (and first prepared) under: it decides its result shape

    @property
    def definition(self) -> bytes:
        """The Parse body after the name: query text, NUL, parameter types."""
        return self.parse[5 + len(self.server_name):]


class StatementNames:
    """Names server statements by content and context; a new generation renames them all (after a schema change)."""

    def __init__(self) -> None:
        self.generation = 0
        # How many client names, across all clients, stand for each server statement: the last one's Close
        # really closes it (ClientStatements._close).
        self.holders: dict[bytes, int] = {}

    def hold(self, server_name: bytes) -> None:
        self.holders[server_name] = self.holders.get(server_name, 0) + 1

    def let_go(self, server_name: bytes) -> bool:
        """One client name for ``server_name`` is gone; True when it was the last."""
        left = self.holders.get(server_name, 1) - 1
        if left > 0:
            self.holders[server_name] = left
            return False
        self.holders.pop(server_name, None)
        return True

    def statement(self, definition: bytes, search_path: str) -> Statement:
        """``definition`` is a Parse body after the name: query text, NUL, parameter types.

        Clients share a statement only under the same search_path: PostgreSQL re-analyses a statement
        used under another one, and fails it (0A000) if the names now mean tables of another shape, where
        the client's own Parse would have succeeded.
        """
        hashed = hashlib.blake2b(definition, digest_size=10, salt=self.generation.to_bytes(8, "big"))
        hashed.update(b"\x00" + search_path.encode())
        digest = hashed.hexdigest()
        name = f"pgmux_{digest}".encode() + b"\x00"
        parse = m.message(m.PARSE, name + definition)
        text = definition[:definition.find(b"\x00")]
        session_sql = text if mentions_session_state(parse) and session_effects(text) else None
        return Statement(name, parse, mentions_statement_drop(definition), session_sql, search_path)

    def invalidate_all(self) -> None:
        self.generation += 1


class ServerStatements:
    """The statements one server holds, least recently used first."""

    __slots__ = ("_lru",)

    def __init__(self) -> None:
        self._lru: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, name: bytes) -> bool:
        return name in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, name: bytes) -> None:
        self._lru.move_to_end(name)

    def add(self, name: bytes) -> None:
        self._lru[name] = None

    def discard(self, name: bytes) -> None:
        self._lru.pop(name, None)

    def clear(self) -> None:
        self._lru.clear()

    def evict_over(self, limit: int) -> list[bytes]:
        """Forget the least recently used names beyond ``limit``; the caller closes them on the server."""
        evicted = []
        while len(self._lru) > limit:
            name, _ = self._lru.popitem(last=False)
            evicted.append(name)
        return evicted


class PendingParse:
    """A Parse sent to a server whose ParseComplete has not come back yet.

    A plain class, not a dataclass: one is made per Parse, and compiled, a plain class's __init__
    is native code where a dataclass's generated one is interpreted.
    """

    __slots__ = ("batch", "injected", "client_name", "server_name")

    def __init__(self, batch: int, injected: bool, client_name: bytes | None, server_name: bytes | None) -> None:
        self.batch = batch  # the number of the batch end (Sync/Query/FunctionCall) that closes its batch
        self.injected = injected  # pgmux's own: its ParseComplete is swallowed
        self.client_name = client_name  # a client name this Parse registered, undone if the Parse fails
        self.server_name = server_name  # a statement this Parse adds to the server, undone if it fails


class ServerPrepared:
    """What rewriting needs to know about the server a client is linked to, kept on that server."""

    __slots__ = ("statements", "pending", "injected", "batches_sent", "batches_answered", "discard_all",
                 "unnamed_drop", "trusted", "_server_params", "_plain", "_plain_batch")

    def __init__(self, server_params: dict[str, str]) -> None:
        self._server_params = server_params  # the server's parameters as pgmux knows them (kept current there)
        self.statements = ServerStatements()
        self.pending: deque[PendingParse] = deque()
        self.injected = 0  # entries of ``pending`` that are pgmux's own: while any, replies need sorting
        # Client Parses of the unnamed statement in flight, all closed by batch ``_plain_batch``, counted instead
        # of queued while ``pending`` is empty (see expect_plain); 0 whenever ``pending`` holds anything.
        self._plain = 0
        self._plain_batch = 0
        self.batches_sent = 0
        self.batches_answered = 0
        # ``statements`` may be wrong (a stale plan, a statement drop): DEALLOCATE ALL at the next safe point.
        self.discard_all = False
        # The text of the server's unnamed statement, when it mentions DEALLOCATE or DISCARD: its Binds may drop.
        self.unnamed_drop: bytes | None = None
        # Grows each time rewriting relies on the server holding a statement (sends no Parse for it):
        # a batch that did may fail with 26000 if something pgmux could not see dropped it.
        self.trusted = 0

    def search_path(self) -> str:
        """The server's search_path, the client's own once linked (its parameters are synced first)."""
        return self._server_params.get("search_path", "")

    def forget_all(self) -> None:
        """Something may have dropped this server's statements: take them all as gone, and make sure they are.

        Forgotten statements are prepared again before their next use; the DEALLOCATE ALL that
        ``discard_all`` asks for removes those a false alarm left behind, which re-preparing would
        otherwise collide with (42P05).
        """
        self.statements.clear()
        self.discard_all = True

    def deallocating_all(self) -> None:
        """pgmux is sending DEALLOCATE ALL ahead of anything else: the server will hold none of its statements."""
        self.statements.clear()
        self.discard_all = False

    def expect(self, parse: PendingParse) -> None:
        if self._plain:
            self._queue_plain()  # ahead of it, as they were sent
        self.pending.append(parse)
        if parse.injected:
            self.injected += 1

    def expect_plain(self, batch: int) -> None:
        """A client's Parse of the unnamed statement, closed by batch ``batch``: nothing to undo if it fails, and
        only its place counts. While nothing else is in flight (most extended-protocol transactions) it is
        counted, not queued: a PendingParse and a deque entry per transaction cost more than the rest of this
        bookkeeping."""
        if not self.pending and (not self._plain or self._plain_batch == batch):
            self._plain += 1
            self._plain_batch = batch
        else:
            self.expect(PendingParse(batch, False, None, None))

    def _queue_plain(self) -> None:
        for _unused in range(self._plain):
            self.pending.append(PendingParse(self._plain_batch, False, None, None))
        self._plain = 0

    def on_parse_complete(self) -> bool:
        """A ParseComplete arrived: True if it answers a client's Parse (forward it), False if ours."""
        if self._plain:
            self._plain -= 1  # nothing else is in flight: it is one of those
            return True
        if not self.pending:
            return True
        return not self._pop().injected

    def _pop(self) -> PendingParse:
        parse = self.pending.popleft()
        if parse.injected:
            self.injected -= 1
        return parse

    def start_link(self) -> None:
        """A client is linked at a batch boundary: nothing is in flight, batch numbers restart."""
        self._plain = 0
        if self.pending:
            self.pending.clear()
            self.injected = 0
        self.batches_sent = self.batches_answered = 0

    def on_ready_for_query(self, client_statements: ClientStatements) -> None:
        """A batch ended: Parses of it still unanswered were skipped after an error; undo them."""
        self.batches_answered += 1
        if self._plain and self._plain_batch <= self.batches_answered:
            self._plain = 0  # unnamed: nothing to undo
        while self.pending and self.pending[0].batch <= self.batches_answered:
            failed = self._pop()
            if failed.client_name is not None:
                client_statements.forget(failed.client_name)
            if failed.server_name is not None:
                self.statements.discard(failed.server_name)


class ClientStatements:
    """One client's named statements and the rewriting of its Parse/Bind/Describe/Close messages."""

    __slots__ = ("names", "_registry", "_counters", "bound_session_sql", "_paths")

    def __init__(self, registry: StatementNames, counters: PreparedCounters) -> None:
        self.names: dict[bytes, Statement] = {}  # client name (NUL-terminated) -> server statement
        # The search_paths its statements were made under (kept, not pruned): nearly always one, often none.
        self._paths = _NO_PATHS
        # The text of the statement the last Bind ran, when it may change the session (the client reads it).
        self.bound_session_sql: bytes | None = None
        self._registry = registry
        self._counters = counters

    def rewrite(self, kind: int, data: bytes | memoryview, link: ServerPrepared) -> bytes | memoryview:
        """The bytes to send to the server in place of one whole client message of ``kind``.

        Raises ProtocolViolation for a message too malformed to read its statement name from.
        """
        try:
            if kind == m.BIND:
                return self._bind(data, link)
            if kind == m.SYNC or kind == m.FUNCTION_CALL:
                link.batches_sent += 1
                return data
            if kind == m.PARSE:
                return self._parse(data, link)
            if kind == m.DESCRIBE:
                return self._describe(data, link)
            if kind == m.CLOSE:
                return self._close(data, link)
            return data
        except (ValueError, IndexError):
            raise ProtocolViolation(f"malformed {chr(kind)!r} message") from None

    def can_relay(self, binds: int, link: ServerPrepared) -> bool:
        """Whether messages naming none of the client's statements, ``binds`` Binds among them, may be sent on
        unread (the compiled relay, proxy/_relay.c): not a Bind of an unnamed statement that may drop statements."""
        return not binds or link.unnamed_drop is None

    def relayed(self, parses: int, batch_ends: int, link: ServerPrepared) -> None:
        """The compiled relay sent on messages naming none of the client's statements: ``parses`` unnamed Parses,
        all before the first of ``batch_ends`` batch ends, whose texts drop no statement. What rewrite notes of them."""
        for _unused in range(parses):
            link.expect_plain(link.batches_sent + 1)
        if parses:
            link.unnamed_drop = None
        link.batches_sent += batch_ends

    def note_query(self, data: bytes | memoryview, link: ServerPrepared) -> None:
        """A simple Query passes unchanged; it ends a batch, and may drop statements (see _note_drop)."""
        link.batches_sent += 1
        # The compiled word test first: this runs for every simple query. A Query too large to hold
        # whole (its rest streams on) cannot be searched: it is taken to drop them (over-detection
        # costs a DEALLOCATE ALL and re-preparing; a miss would fail every client's statements there).
        if mentions_statement_drop(data) or not is_whole(data):
            self._note_drop(data[5:], link)

    def _note_drop(self, sql: bytes | memoryview, link: ServerPrepared) -> None:
        """``sql`` (up to a NUL) mentions DEALLOCATE or DISCARD, anywhere: it may empty the linked server.

        The server's statements are forgotten on any mention (a miss would fail every client's
        statements there); the client's own names only when a statement surely drops them all, as
        PostgreSQL drops them (a wrong guess would fail the client's next use of one).
        """
        link.forget_all()
        if drops_all_statements(bytes(sql).split(b"\x00", 1)[0]):
            self.forget_all()

    def forget(self, name: bytes) -> None:
        """The client name ``name`` (NUL-terminated) no longer exists, if it did."""
        statement = self.names.pop(name, None)
        if statement is not None:
            self._registry.let_go(statement.server_name)

    def forget_all(self) -> None:
        """The client has no names any more (it dropped them all, or it is gone)."""
        for statement in self.names.values():
            self._registry.let_go(statement.server_name)
        self.names.clear()

    def forget_parsed_names(self, frames: list[Frame]) -> None:
        """Undo the client names that the Parses among ``frames`` registered: the batch is sent again.

        Sent again as it was, each Parse registers its name anew; left registered, the name would read as
        a redefinition (refused by PostgreSQL with 42P05).
        """
        for frame in frames:
            data = frame.data
            if frame.kind == m.PARSE and data[5] != 0:
                body = bytes(data[5:])
                self.forget(body[:body.index(b"\x00") + 1])

    def _parse(self, data: bytes | memoryview, link: ServerPrepared) -> bytes | memoryview:
        if data[5] == 0:
            # Unnamed statements are the client's own business, but their ParseComplete is counted
            # like any other so that swallowed ones are told apart by position.
            link.expect_plain(link.batches_sent + 1)
            # Nothing is dropped before it runs: its Binds, however late in the batch, are where to look.
            may_drop = mentions_statement_drop(data) or not is_whole(data)
            link.unnamed_drop = bytes(data[6:]) if may_drop else None
            return data
        self._counters.client_parses += 1
        body = bytes(data[5:])
        end = body.index(b"\x00") + 1
        name = body[:end]
        existing = self.names.get(name)
        if existing is not None:
            # PostgreSQL refuses to redefine a name: let the server say so (42P05) about our statement.
            out = self._ensure(existing, link)
            link.expect_plain(link.batches_sent + 1)
            self._counters.server_parses += 1
            return out + existing.parse
        statement = self._registry.statement(body[end:], link.search_path())
        self.names[name] = statement
        self._registry.hold(statement.server_name)
        if statement.search_path not in self._paths:
            self._paths = self._paths | {statement.search_path}
        if statement.server_name in link.statements:
            link.statements.touch(statement.server_name)
            link.trusted += 1
            link.expect(PendingParse(link.batches_sent + 1, False, name, None))
            # The server has it: an unnamed Parse of the same text earns the real ParseComplete.
            return m.message(m.PARSE, b"\x00" + body[end:])
        link.statements.add(statement.server_name)
        link.expect(PendingParse(link.batches_sent + 1, False, name, statement.server_name))
        self._counters.server_parses += 1
        return statement.parse

    def _bind(self, data: bytes | memoryview, link: ServerPrepared) -> bytes | memoryview:
        if link.unnamed_drop is not None and data[bytes(data).index(b"\x00", 5) + 1] == 0:
            self._note_drop(link.unnamed_drop, link)  # the Execute of this Bind of it may empty the server
        if not self.names:
            return data  # no name of ours can be in it: unnamed or unknown (the server answers 26000)
        body = bytes(data[5:])
        portal_end = body.index(b"\x00") + 1
        name_end = body.index(b"\x00", portal_end) + 1
        statement = self.names.get(body[portal_end:name_end])
        if statement is None:
            return data  # unnamed, or unknown: the server answers 26000 with the client's own name
        self._counters.binds += 1
        self.bound_session_sql = statement.session_sql
        out = self._ensure(statement, link)
        # The length from the header, not from the bytes here: ``data`` may be the head of a Bind
        # whose parameters stream on behind it.
        length = _TYPED_HEADER.unpack_from(data)[1] + len(statement.server_name) - (name_end - portal_end)
        out += _TYPED_HEADER.pack(m.BIND, length) + body[:portal_end] + statement.server_name + body[name_end:]
        if statement.may_drop_statements:
            self._note_drop(statement.definition, link)  # the Execute of this Bind may empty the server
        return out

    def made_under_other_paths(self, segments: list[Segment], link: ServerPrepared) -> list[Statement]:
        """The statements ``segments`` Bind or Describe that the linked server lacks and that were made under
        another search_path than the session's now: injected as they are, they would be analysed under the
        new one and could return rows of another shape than the client was told (PostgreSQL itself fails
        such a use with 0A000). The server must prepare them under their own (ServerConnection.prepare_under).
        """
        paths = self._paths
        current = link.search_path()
        if not paths or len(paths) == 1 and current in paths:
            return []  # the usual case: every statement was made under the search_path in force
        found: list[Statement] = []
        for frame in segments:
            if not isinstance(frame, Frame):
                continue
            data = frame.data
            if frame.kind == m.BIND:
                body = bytes(data[5:])
                portal_end = body.index(b"\x00") + 1
                name = body[portal_end:body.index(b"\x00", portal_end) + 1]
            elif frame.kind == m.DESCRIBE and data[5] == ord("S"):
                name = bytes(data[6:])
            else:
                continue
            statement = self.names.get(name)
            if (statement is not None and statement.search_path != current
                    and statement.server_name not in link.statements and statement not in found):
                found.append(statement)
        return found

    def _describe(self, data: bytes | memoryview, link: ServerPrepared) -> bytes | memoryview:
        if data[5] != ord("S") or not self.names:
            return data  # portals keep their names; unknown statements the server refuses itself
        statement = self.names.get(bytes(data[6:]))
        if statement is None:
            return data
        return self._ensure(statement, link) + m.message(m.DESCRIBE, b"S" + statement.server_name)

    def _close(self, data: bytes | memoryview, link: ServerPrepared) -> bytes | memoryview:
        if data[5] != ord("S"):
            return data
        statement = self.names.pop(bytes(data[6:]), None)
        if statement is None:
            return data
        server_name = statement.server_name
        if self._registry.let_go(server_name) and server_name in link.statements:
            # No client holds it any more: closed on this server (others drop it as the least recently used).
            link.statements.discard(server_name)
            return m.message(m.CLOSE, b"S" + server_name)
        # Shared with other clients (or not here): kept; a Close of a missing name earns the CloseComplete.
        return m.message(m.CLOSE, b"S" + _ABSENT_STATEMENT)

    def _ensure(self, statement: Statement, link: ServerPrepared) -> bytes:
        """The Parse to inject first if the linked server lacks ``statement``, else nothing."""
        if statement.server_name in link.statements:
            link.statements.touch(statement.server_name)
            link.trusted += 1
            self._counters.hits += 1
            return b""
        self._counters.misses += 1
        self._counters.server_parses += 1
        link.statements.add(statement.server_name)
        link.expect(PendingParse(link.batches_sent + 1, True, None, statement.server_name))
        return statement.parse


def needs_whole(head: Frame) -> bool:
    """Whether rewriting needs all of a captured message of which only ``head`` is here (it is too large to
    hold unasked; without this its rest streams on to the server).

    A named Parse is renamed after a hash of all of it and kept to prepare it on other servers. Bind,
    Describe and Close are renamed from the names at their start: needed whole only if those do not
    end within the head. A Query only if it could still be DISCARD ALL or DEALLOCATE ALL padded with
    whitespace (``note_query``).
    """
    kind = head.kind
    data = bytes(head.data)
    if kind == m.PARSE:
        return data[5] != 0
    if kind == m.BIND:
        return data.count(b"\x00", 5) < 2
    if kind == m.DESCRIBE or kind == m.CLOSE:
        return b"\x00" not in data[6:]
    if kind == m.QUERY:
        return len(data[5:].translate(None, _WHITESPACE)) <= _RESET_ALL_LONGEST
    return False


def resets_all_statements(sql: str) -> bool:
    """Whether ``sql`` (e.g. server_reset_query) drops every prepared statement of the session."""
    return drops_all_statements(sql.encode())


def deallocate_sql(names: list[bytes]) -> str:
    """SQL that removes evicted statements from a server (sent by pgmux between transactions)."""
    return ";".join(f'DEALLOCATE "{name[:-1].decode()}"' for name in names)
