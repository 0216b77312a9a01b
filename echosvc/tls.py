"""TLS: contexts from the files, their reload, and the handshake stage.

**Contexts.** `load_context` builds a fresh `ssl.SSLContext` from the files
``--tls-cert`` (a PEM chain, leaf first; it may hold the key),
``--tls-key`` and ``--tls-client-ca`` name, every time it is called: a
reload reads the files again even if they look unchanged, since a rotated
certificate is often the same path. An error is a `TLSLoadError` naming the
`~echosvc.config.Config` field it concerns, so the CLI can name the flag: a
key that is garbage, encrypted or does not match the certificate is
reported against ``tls_key`` (against ``tls_cert`` when the key is expected
inside the certificate file). The certificate's expiry (``not_after``) is
read from the leaf with a few lines of DER walking, not a crypto library.

**Reload.** `TLSContexts` holds the current context. `TLSContexts.reload`
loads a new one and swaps it in only if the load succeeded; a connection
takes the current context when its handshake starts and keeps it, so
connections already open are untouched by a reload (the context stays
alive as long as some `ssl.SSLObject` uses it). `TLSStage.reload` is the
daemon's SIGHUP hook: it logs ``tls_reloaded`` (``not_after``) or
``tls_reload_failed`` (error, ``error``).

**The stage.** `TLSStage` wraps the stream in a `trio.SSLStream` and runs an
explicit ``do_handshake()`` under the stage's own deadline
(``--tls-handshake-timeout``; reason ``tls_timeout``; the pipeline runner
owns the deadline). A handshake that fails on the TLS level -- no common
version, a ClientHello that is not one, a rejected client certificate, an
EOF in the middle -- closes with ``tls_failed`` (``detail``: OpenSSL's
reason); a transport that breaks under it (a reset) is ``reset``. Things
learned from trio's ``_ssl.py``:

* a cancelled or failed handshake leaves the `trio.SSLStream` broken, and
  ``SSLStream.aclose()`` on one that never finished its handshake would try
  to finish it first: the stage never hands on such a stream, so the
  pipeline closes the transport underneath the hard way;
* `trio.SSLStream` has no ``send_eof`` (python-trio/trio#823), so the echo's
  lingering close is ``aclose()``: our ``close_notify``, under the polite
  close's bound, after which the transport (`_Transport.aclose`) lingers as
  a TCP connection would -- FIN, then input discarded until the peer closes
  -- so that unread input does not turn our last echo into a RST;
* ``https_compatible=False``: a peer that vanishes without ``close_notify``
  is a truncation (``reset``), told apart from a clean close (``eof``);
* the bytes a stage before (the PROXY header's) read beyond its own are the
  first bytes the handshake reads (`_Transport`), so none is lost.

After the handshake the echo runs on the `trio.SSLStream` exactly as on
TCP: byte counts are plaintext, and the connection gains the
``tls_version`` field and, under mutual TLS, ``client_subject`` (RFC 4514).
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import structlog
import trio

from .config import CloseReason, Config, TLSVersion
from .pipeline import Link, Refused, Stage

__all__ = [
    "LoadedContext",
    "TLSContexts",
    "TLSLoadError",
    "TLSStage",
    "load_context",
    "rfc4514_name",
]

_log = structlog.get_logger("echosvc")

_MIN_VERSION = {
    TLSVersion.TLS1_2: ssl.TLSVersion.TLSv1_2,
    TLSVersion.TLS1_3: ssl.TLSVersion.TLSv1_3,
}

# The lingering close after our close_notify, as `echosvc.connection`'s
# (the caller's bound is the real one; this only caps a caller with none).
_LINGER_S = 2.0


class TLSLoadError(ValueError):
    """A TLS file cannot be used. ``field`` names the `Config` field it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@attrs.frozen
class LoadedContext:
    """A server context and what the logs say about it.

    Attributes:
      context: the `ssl.SSLContext` (``PROTOCOL_TLS_SERVER``).
      not_after: the leaf certificate's expiry, ISO 8601 in UTC
          (``2027-01-31T12:00:00Z``).

    """

    context: ssl.SSLContext
    not_after: str


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for a password.
    raise _EncryptedKey


def load_context(
    cert: str,
    key: str | None = None,
    client_ca: str | None = None,
    min_version: TLSVersion = TLSVersion.TLS1_3,
) -> LoadedContext:
    """Build a new server context from the files; blocking file I/O.

    Args:
      cert: PEM file with the certificate chain, leaf first (and the key,
          if ``key`` is None).
      key: PEM file with the (unencrypted) private key.
      client_ca: PEM file of CA certificates; given, every client must
          present a certificate signed by one of them (mutual TLS).
      min_version: the oldest TLS version accepted.

    Raises:
      TLSLoadError: a file cannot be read or used; ``field`` is
          ``tls_cert``, ``tls_key`` or ``tls_client_ca``.

    """
    pem = _read("tls_cert", cert)
    not_after = _leaf_not_after(cert, pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSION[min_version]
    # No renegotiation (TLS 1.2): it is the one thing that would make a
    # cancelled receive break the stream (trio's SSLStream docs).
    context.options |= ssl.OP_NO_RENEGOTIATION
    key_field = "tls_key" if key is not None else "tls_cert"
    if key is not None:
        if b"PRIVATE KEY-----" not in _read("tls_key", key):
            raise TLSLoadError("tls_key", f"{key}: no PEM private key in it")
    elif b"PRIVATE KEY-----" not in pem:
        raise TLSLoadError("tls_cert", f"{cert}: no private key in it; give one with --tls-key")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise TLSLoadError(
            key_field, f"{key or cert}: the private key is encrypted; give it unencrypted"
        ) from None
    except ssl.SSLError as exc:
        raise TLSLoadError(key_field, f"{key or cert}: {_key_problem(exc)}") from None
    except OSError as exc:
        raise TLSLoadError(key_field, f"{key or cert}: {exc.strerror or exc}") from None
    if client_ca is not None:
        _read("tls_client_ca", client_ca)
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TLSLoadError(
                "tls_client_ca", f"{client_ca}: no usable CA certificate ({_reason(exc)})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return LoadedContext(context, not_after)


def _read(field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TLSLoadError(field, f"cannot read {path}: {exc.strerror or exc}") from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    return str(exc)


def _key_problem(exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return "the private key does not match the certificate"
    if exc.reason and exc.reason != "PEM lib":
        return f"no usable private key ({_reason(exc)})"
    return "the private key is garbled"


def _leaf_not_after(path: str, pem: bytes) -> str:
    """The first certificate's notAfter, checking every certificate parses."""
    text = pem.decode("ascii", errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    blocks = []
    start = text.find(begin)
    while start != -1:
        stop = text.find(end, start)
        if stop == -1:
            break
        blocks.append(text[start : stop + len(end)])
        start = text.find(begin, stop)
    if not blocks:
        raise TLSLoadError("tls_cert", f"{path}: no PEM certificate in it")
    expiries = []
    for block in blocks:
        try:
            expiries.append(not_after_of(ssl.PEM_cert_to_DER_cert(block)))
        except ValueError:
            raise TLSLoadError("tls_cert", f"{path}: a certificate in it is garbled") from None
    return expiries[0].strftime("%Y-%m-%dT%H:%M:%SZ")


def not_after_of(der: bytes) -> datetime.datetime:
    """The ``notAfter`` of a DER certificate (RFC 5280 4.1), in UTC.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE {
    notBefore, notAfter }, ... } ... }

    Raises:
      ValueError: ``der`` is not shaped like a certificate.

    """
    tbs, _ = _tlv(der, 0, 0x30)  # Certificate
    tbs, _ = _tlv(der, tbs, 0x30)  # tbsCertificate: its content
    offset = tbs
    if der[offset : offset + 1] == b"\xa0":  # [0] EXPLICIT version
        offset = _skip(der, offset)
    for _ in range(3):  # serialNumber, signature, issuer
        offset = _skip(der, offset)
    validity, _ = _tlv(der, offset, 0x30)
    after = _skip(der, validity)  # past notBefore
    value, value_end = _tlv(der, after, None)
    tag = der[after]
    raw = der[value:value_end].decode("ascii")
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ; RFC 5280: 50-99 are 19xx
        year = int(raw[:2])
        raw = f"{1900 + year if year >= 50 else 2000 + year}{raw[2:]}"
    elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError("notAfter is not a time")
    if not raw.endswith("Z") or len(raw) != 15:
        raise ValueError("notAfter is not in UTC")
    return datetime.datetime.strptime(raw, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)


def _tlv(der: bytes, offset: int, tag: int | None) -> tuple[int, int]:
    """The content's start and end of the DER element at ``offset``."""
    if offset + 2 > len(der) or (tag is not None and der[offset] != tag):
        raise ValueError("unexpected DER element")
    length = der[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("DER element runs past the end")
    return start, start + length


def _skip(der: bytes, offset: int) -> int:
    return _tlv(der, offset, None)[1]


# RFC 4514 section 3's short names, under the names Python's getpeercert() uses.
_SHORT_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def rfc4514_name(name: Sequence[Sequence[tuple[str, str]]]) -> str:
    """A distinguished name from `ssl.SSLSocket.getpeercert` in RFC 4514 form.

    ``((('organizationName', 'Example'),), (('commonName', 'client'),))``
    is ``CN=client,O=Example``: RFC 4514 writes the last RDN first.
    """
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(kind, kind)}={_escape(value)}" for kind, value in rdn)
        for rdn in reversed(name)
    )


def _escape(value: str) -> str:
    escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


class TLSContexts:
    """The current server context, replaced by a successful `reload`.

    Args:
      load: builds a new `LoadedContext` (blocking file I/O); raises
          `TLSLoadError`.

    Raises:
      TLSLoadError: from the first load, made here.

    """

    def __init__(self, load: Callable[[], LoadedContext]) -> None:
        self._load = load
        self.current = load()

    @classmethod
    def from_config(cls, config: Config) -> TLSContexts:
        cert = config.tls_cert
        if cert is None:
            raise ValueError("no --tls-cert in the configuration")
        return cls(
            lambda: load_context(cert, config.tls_key, config.tls_client_ca, config.tls_min_version)
        )

    @property
    def context(self) -> ssl.SSLContext:
        return self.current.context

    async def reload(self) -> LoadedContext:
        """Read the files again; the new context serves new connections.

        Raises:
          TLSLoadError: and the current context stays.

        """
        loaded = await trio.to_thread.run_sync(self._load)
        self.current = loaded
        return loaded


class _Transport(trio.abc.HalfCloseableStream):
    """The stream under a `trio.SSLStream`: the stage's own, with the bytes
    an earlier stage read beyond its own first, and a lingering close."""

    __slots__ = ("_pending", "stream")

    def __init__(self, stream: trio.abc.Stream, pending: bytes) -> None:
        self.stream = stream
        self._pending = pending

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._pending:
            await trio.lowlevel.checkpoint()
            size = len(self._pending) if max_bytes is None else max_bytes
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """After our close_notify: FIN, then discard input until the peer
        closes (bounded by the caller, and by `_LINGER_S`); then close."""
        try:
            with trio.move_on_after(_LINGER_S):
                await self.send_eof()
                while await self.stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)


class TLSStage(Stage):
    """The TLS handshake, as a pipeline stage.

    Args:
      contexts: the `TLSContexts` whose current context each handshake uses.
      handshake_timeout: seconds for the whole handshake; ``0``: none.
      client_certificates: a client certificate is required (mutual TLS):
          log its subject as ``client_subject``.

    One instance serves every connection of a server. What the next stage
    gets: the `trio.SSLStream`, nothing pending (what arrived with the
    handshake's last bytes is in the TLS stream's own buffer), and the
    ``tls_version`` (and ``client_subject``) fields.
    """

    timeout_reason = CloseReason.TLS_TIMEOUT

    def __init__(
        self, contexts: TLSContexts, handshake_timeout: float, *, client_certificates: bool = False
    ) -> None:
        self.contexts = contexts
        self.timeout = handshake_timeout
        self.client_certificates = client_certificates

    @classmethod
    def from_config(cls, config: Config) -> TLSStage:
        """The stage the ``--tls-*`` options ask for; loads the files.

        Raises:
          TLSLoadError: a file cannot be used.

        """
        return cls(
            TLSContexts.from_config(config),
            config.tls_handshake_timeout,
            client_certificates=config.tls_client_ca is not None,
        )

    async def open(self, link: Link) -> Link:
        stream = trio.SSLStream(
            _Transport(link.stream, link.pending),
            self.contexts.context,
            server_side=True,
            https_compatible=False,
        )
        problem = None
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            if not isinstance(exc.__cause__, ssl.SSLError):
                raise  # the transport broke under it: the peer reset
            problem = _handshake_problem(exc.__cause__)
        if problem is not None:
            await _send_alert(stream)
            raise Refused(CloseReason.TLS_FAILED, problem)
        opened = link.evolve(stream=stream, pending=b"")
        version = stream.version()
        if version is not None:
            opened = opened.with_field("tls_version", version)
        if self.client_certificates:
            cert: Any = stream.getpeercert()
            if cert and cert.get("subject"):
                opened = opened.with_field("client_subject", rfc4514_name(cert["subject"]))
        return opened

    async def reload(self) -> None:
        """The reload hook: read the files again, and log how it went."""
        try:
            loaded = await self.contexts.reload()
        except TLSLoadError as exc:
            _log.error("tls_reload_failed", error=str(exc))
        else:
            _log.info("tls_reloaded", not_after=loaded.not_after)


async def _send_alert(stream: trio.SSLStream[_Transport]) -> None:
    """Send the alert OpenSSL wrote for a failed handshake, if it can be had.

    trio's SSLStream marks itself broken and raises without sending what
    OpenSSL had queued, so a client would see a bare EOF where it should read
    why (``alert certificate required``, ``alert protocol version``). The
    alert sits in the stream's outgoing memory BIO, a private attribute:
    without it (another trio) the client gets the EOF, nothing worse. Sent
    under the stage's own deadline, like the rest of the handshake.
    """
    outgoing = getattr(stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO):
        return
    alert = outgoing.read()
    if alert:
        # The client may have gone already.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.transport_stream.stream.send_all(alert)


def _handshake_problem(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLEOFError):
        return "EOF during the handshake"
    verify = getattr(exc, "verify_message", None)
    if verify:
        return f"certificate verify failed: {verify}"
    return _reason(exc)


def flag_of(field: str) -> str:
    """``tls_key`` as the flag a user types, ``--tls-key``."""
    return "--" + field.replace("_", "-")
