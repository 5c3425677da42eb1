"""Client-side TLS: what a listener offers (ClientTls), and one connection's TLS over memory buffers.

pgmux runs the TLS layer itself, over ``ssl.MemoryBIO`` (as asyncio's own TLS transport does), rather
than through ``loop.start_tls``: a PostgreSQL 17 client that negotiates TLS directly sends its
ClientHello as its first bytes, which pgmux has read before it can tell, and only a layer fed by the
connection can take them. One layer serves both ways in: after an SSLRequest and directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from dataclasses import dataclass
from typing import Any, Final

from asn1crypto import x509 as asn1_x509  # scramp's own dependency: reads a certificate's signature hash

from proxy.layered import LayeredTransport
from proxy.settings import ListenerSettings, Settings, SslMode

ALPN_POSTGRESQL: Final = "postgresql"  # what a direct-TLS client must ask for, as PostgreSQL 17 requires
ALPN_HTTP: Final = "http/1.1"  # what an HTTP listener offers (wss/https); clients need not ask for it
TLS_HANDSHAKE_RECORD: Final = 0x16  # the first byte of a ClientHello: a client negotiating TLS directly
_READ_CHUNK: Final = 1 << 17
_PROTOCOLS: Final = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}
# Client-certificate checks by mode: verify-ca and verify-full require one signed by client_tls_ca_file.
_REQUIRED_MODES: Final = frozenset({SslMode.REQUIRE, SslMode.VERIFY_CA, SslMode.VERIFY_FULL})
_CERTIFICATE_MODES: Final = frozenset({SslMode.VERIFY_CA, SslMode.VERIFY_FULL})


# TlsError reasons (the metric pgmux_tls_handshake_failures_total): not TLS at all, a protocol version or
# cipher the two sides do not share, a client certificate refused, direct TLS without ALPN, others.
TLS_FAILURE_REASONS: Final = ("not_tls", "protocol_version", "client_certificate", "alpn", "handshake", "protocol")


class TlsError(Exception):
    """A connection's TLS failed; ``reason`` is a short label for the metric and the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ClientTlsOptions:
    """The client_tls_* settings that apply to one listener (PgBouncer's names)."""

    sslmode: SslMode
    cert_file: str | None
    key_file: str | None
    ca_file: str | None
    protocols: str
    ciphers: str


class ClientTls:
    """What one listener offers clients: its mode and, unless disabled, its SSL context.

    Built once per listener and again on reload (SIGHUP); connections keep the context they started with.
    """

    __slots__ = ("mode", "context", "end_point", "required_alpn", "offered", "required",
                 "user_must_match_certificate")

    def __init__(self, mode: SslMode, context: ssl.SSLContext | None, end_point: bytes,
                 required_alpn: str | None = ALPN_POSTGRESQL) -> None:
        self.mode = mode
        self.context = context
        # tls-server-end-point channel binding data (RFC 5929): the hash of pgmux's own certificate.
        self.end_point = end_point
        # The ALPN protocol a direct-TLS client must ask for (None: any, or none).
        self.required_alpn = required_alpn
        # Plain attributes, not properties: every login reads them.
        self.offered = context is not None
        self.required = mode in _REQUIRED_MODES  # a plaintext login is refused (require and stricter)
        # verify-full: the client certificate's common name must be the login's user name.
        self.user_must_match_certificate = mode is SslMode.VERIFY_FULL

    def wrap(self, raw: asyncio.Transport, direct: bool) -> TlsTransport:
        """A connection's TLS over its socket's transport ``raw``; ``direct``: it began with a ClientHello."""
        assert self.context is not None
        return TlsTransport(raw, TlsSession(self.context), self.required_alpn if direct else None)


NO_TLS: Final = ClientTls(SslMode.DISABLE, None, b"")


def client_tls_options(settings: Settings, listener: ListenerSettings) -> ClientTlsOptions:
    """The listener's client_tls_* settings, each falling back to the global one."""
    def pick(name: str) -> Any:
        own = getattr(listener, name)
        return own if own is not None else getattr(settings, name)
    return ClientTlsOptions(pick("client_tls_sslmode"), pick("client_tls_cert_file"), pick("client_tls_key_file"),
                            pick("client_tls_ca_file"), pick("client_tls_protocols"), pick("client_tls_ciphers"))


def load_client_tls(options: ClientTlsOptions, http: bool = False) -> ClientTls:
    """The listener's offer, its files read now; ValueError names what is wrong (a reload keeps the old one).

    ``http``: for an HTTP listener (wss/https), whose TLS is always direct: ALPN offers http/1.1 and
    requires nothing, as browsers and WebSocket clients may not send ALPN at all.
    """
    if options.sslmode is SslMode.DISABLE:
        return NO_TLS
    if not options.cert_file or not options.key_file:
        raise ValueError(f"client_tls_sslmode = {options.sslmode.value} needs client_tls_cert_file and "
                         "client_tls_key_file")
    if options.sslmode in _CERTIFICATE_MODES and not options.ca_file:
        raise ValueError(f"client_tls_sslmode = {options.sslmode.value} needs client_tls_ca_file to check "
                         "client certificates against")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version, context.maximum_version = _protocol_range(options.protocols)
    if options.ciphers not in ("", "default"):
        try:
            context.set_ciphers(options.ciphers)
        except ssl.SSLError:
            raise ValueError(f"client_tls_ciphers: no usable cipher in {options.ciphers!r}") from None
    try:
        context.load_cert_chain(options.cert_file, options.key_file)
        if options.ca_file:
            context.load_verify_locations(options.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"client TLS certificate files could not be loaded: {exc}") from None
    if options.sslmode in _CERTIFICATE_MODES:
        context.verify_mode = ssl.CERT_REQUIRED
    elif options.ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL  # a certificate a client offers is checked, none is asked for
    if not http:
        # No session tickets: PostgreSQL drivers do not resume TLS sessions (libpq makes a new SSL context per
        # connection), so the two tickets TLS 1.3 sends by default would cost every handshake for nothing.
        # HTTP clients (fetch, WebSocket) do resume: they keep them.
        context.num_tickets = 0
    context.set_alpn_protocols([ALPN_HTTP if http else ALPN_POSTGRESQL])
    context.sni_callback = _note_server_name
    return ClientTls(options.sslmode, context, _end_point(options.cert_file), None if http else ALPN_POSTGRESQL)


def _protocol_range(protocols: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """PgBouncer's client_tls_protocols: "secure" (TLS 1.2 and 1.3, the default), "all", or a list."""
    names = {name.strip().lower() for name in protocols.replace(",", " ").split()}
    if names <= {"secure", "all", "normal", "default"}:
        return ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED
    unknown = names - _PROTOCOLS.keys()
    if unknown:
        raise ValueError(f"client_tls_protocols: {', '.join(sorted(unknown))} not supported; use secure, "
                         "tlsv1.2 or tlsv1.3 (older versions are not offered)")
    versions = sorted(_PROTOCOLS[name] for name in names)
    return versions[0], versions[-1]


def _end_point(cert_file: str) -> bytes:
    """tls-server-end-point data: the certificate hashed with its signature's hash, SHA-256 for MD5/SHA-1."""
    with open(cert_file, "rb") as file:
        pem = file.read().decode("ascii", "replace")
    der = ssl.PEM_cert_to_DER_cert(pem[:pem.index("-----END CERTIFICATE-----") + 25])
    algorithm = asn1_x509.Certificate.load(der).hash_algo
    return hashlib.new("sha256" if algorithm in ("md5", "sha1") else algorithm, der).digest()


def _note_server_name(ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
    """The SNI callback: keep the host name the client asked for where TlsSession reads it."""
    ssl_object.pgmux_server_name = server_name


class TlsSession:
    """One connection's TLS as a sans-IO machine: encrypted bytes in, plaintext out, and back.

    It calls the C object under ``ssl.SSLObject`` (``_sslobj``) directly, and reads only while bytes are
    buffered rather than until OpenSSL raises "want read": each Python-level wrapper call and raised exception
    is paid per record, and a TLS login or transaction is a handful of records.
    """

    __slots__ = ("_incoming", "_outgoing", "_object", "_ssl", "established", "closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._ssl: Any = self._object._sslobj  # type: ignore[attr-defined]  # CPython's _ssl._SSLSocket
        self.established = False  # the handshake is done
        self.closed = False  # the client sent close_notify

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the client; return the plaintext they complete. Send ``outgoing()`` after."""
        incoming = self._incoming
        incoming.write(data)
        sslobj = self._ssl
        if not self.established:
            try:
                sslobj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except ssl.SSLError as exc:
                raise TlsError(_handshake_reason(exc), exc.reason or str(exc)) from None
            self.established = True
        chunks = []
        while incoming.pending or sslobj.pending():
            try:
                chunk = sslobj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still to come
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            except ssl.SSLError as exc:
                raise TlsError("protocol", exc.reason or str(exc)) from None
            if not chunk:
                break
            chunks.append(chunk)
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def has_outgoing(self) -> bool:
        return self._outgoing.pending > 0

    def outgoing(self) -> bytes:
        """TLS records to send to the client (handshake, alerts, close_notify)."""
        return self._outgoing.read()

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        self._ssl.write(data)
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        """The records that end the TLS session politely (nothing if it never began)."""
        if self.established:
            try:
                self._object.unwrap()
            except ssl.SSLError:
                pass  # the client's close_notify is not awaited: the socket closes next
        return self._outgoing.read()

    @property
    def server_name(self) -> str | None:
        """The host name the client asked for (SNI), if any."""
        return getattr(self._object, "pgmux_server_name", None)

    @property
    def alpn_protocol(self) -> str | None:
        return self._object.selected_alpn_protocol()

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._object

    def peer_common_name(self) -> str | None:
        """The common name of the client's certificate, when it sent one that was verified."""
        certificate = self._object.getpeercert() or {}
        for rdn in certificate.get("subject", ()):
            for attribute in rdn:
                if attribute[0] == "commonName":
                    return str(attribute[1])
        return None


def _handshake_reason(exc: ssl.SSLError) -> str:
    reason = (exc.reason or "").upper()
    if "CERTIFICATE" in reason:
        return "client_certificate"
    if "VERSION" in reason or "PROTOCOL" in reason or "CIPHER" in reason:
        return "protocol_version"
    if "HTTP" in reason or "WRONG_VERSION_NUMBER" in reason or "RECORD" in reason:
        return "not_tls"
    return "handshake"


class TlsTransport(LayeredTransport):
    """A client connection's TLS: plaintext written is encrypted onto the socket's transport, and bytes the
    socket receives are decrypted by ``receive`` (the connection calls it; reading and flow control stay
    the socket's)."""

    def __init__(self, raw: asyncio.Transport, session: TlsSession, required_alpn: str | None) -> None:
        super().__init__(raw)
        self.session = session
        # What ALPN must say once the handshake is done: postgresql for a PostgreSQL client that began with a
        # ClientHello, not an SSLRequest; None: anything.
        self._required_alpn = required_alpn
        self._checked = False

    def receive(self, data: bytes) -> bytes:
        """The plaintext ``data`` completes; handshake records are answered here. Raises TlsError."""
        session = self.session
        try:
            plain = session.receive(data)
        finally:
            if session.has_outgoing and not self.raw.is_closing():
                self.raw.write(session.outgoing())  # handshake records, or an alert when it failed
        if not self._checked and session.established:
            self._checked = True
            required = self._required_alpn
            if required is not None and session.alpn_protocol != required:
                # As PostgreSQL 17: direct TLS without ALPN could be any protocol's client.
                raise TlsError("alpn", f"direct TLS connection without ALPN protocol {required}")
        return plain

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.raw.is_closing():
            self.raw.write(self.session.encrypt(data))

    def close(self) -> None:
        if not self.raw.is_closing():
            ending = self.session.close_notify()
            if ending:
                self.raw.write(ending)
        self.raw.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.session.ssl_object
        if name == "peercert":
            return self.session.ssl_object.getpeercert()
        return super().get_extra_info(name, default)
