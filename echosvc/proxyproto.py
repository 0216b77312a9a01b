"""The PROXY protocol (v1 and v2), sans-IO: bytes in; need-more, a header, or a refusal.

A load balancer that relays a connection starts it with one PROXY header that
names the real client (HAProxy's ``doc/proxy-protocol.txt``, cited below as
"spec §N"). `ProxyParser` is fed whatever ``receive_some`` returned and
answers ``None`` (need more), a `ProxyHeader` (with ``rest``: the bytes after
the header, untouched, which belong to the next stage), or raises
`ProxyProtocolError` with a short reason. Like h11's ``ERROR`` state, a refusal
is sticky. No I/O and no clock: the stage that reads the header owns its
deadline.

The parser refuses a header as soon as its bytes can no longer become a valid
one, never later (spec §2.1: "abort the connection as soon as possible"), so
a malformed header closes at once rather than at the deadline, while a valid
one may arrive in any number of pieces. It never buffers more than the
largest header it accepts (107 bytes for v1, 16 + 4096 for v2), and it
consumes exactly one header: a second one is payload. `encode_v1` and
`encode_v2` build headers for the client side (``check``, ``bench``, tests).

Built against these classes of bug, each seen in a real parser:

- CVE-2021-23409 (go-proxyproto): no timeout on reading the header, so a
  silent peer holds the connection forever. Not this module's job (it has no
  clock): the stage reads under ``--proxy-timeout``.
- CVE-2021-23351 (go-proxyproto): the v1 line read without a limit. Here a v1
  line is refused once 107 bytes pass without CRLF, or earlier.
- CVE-2019-14243 (mastercactapus/proxyprotocol): a v2 header whose declared
  length is shorter than its address block crashed the reader. Here the
  length is checked against the family's block the moment it arrives.

Why not the ``proxy-protocol`` package from PyPI: 0.11.3, tried against the
spec for issue 10, raises a raw ``struct.error`` on a truncated v2 TCPv4
header, accepts family byte ``0x41``, v1 ports ``+80``, ``080`` and ``1_0``,
IPv6 zone ids and v1 lines over 107 bytes, and reads the v1 line with an
unbounded ``readline()``. Python itself sets two of those traps: ``int()``
takes ``"+80"``, ``"080"``, ``"0_80"`` and ``" 80"``, and
``ipaddress.IPv6Address`` takes ``"fe80::1%eth0"``; so every v1 field is
matched byte-exact before anything converts it.

`ProxyStage` is the parser at work: the `echosvc.pipeline` stage that reads
the header off a connection (``--proxy-protocol``, ``--proxy-trusted``,
``--proxy-timeout``). It refuses a peer outside the trusted networks before
reading a byte, reads under the stage's own deadline, refuses the moment the
parser does, and hands on the client the header names together with the
bytes that followed the header.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any, Final, Literal

import attrs

from .config import CloseReason, Config, IPNetwork, ProxyProtocol
from .listeners import address_ip, format_address
from .pipeline import Link, Refused, Stage

__all__ = [
    "MAX_V1_LINE",
    "MAX_V2_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "V2_SIGNATURE",
    "Accept",
    "Address",
    "ProxyCommand",
    "ProxyHeader",
    "ProxyParser",
    "ProxyProtocolError",
    "ProxyStage",
    "crc32c",
    "encode_v1",
    "encode_v2",
]

Address = tuple[str, int]
"""An ``(ip, port)`` pair; the ip in Python's canonical text form."""

Accept = Literal["v1", "v2", "any"]
"""Which header versions a `ProxyParser` takes."""

MAX_V1_LINE: Final = 107
"""The longest v1 line, CRLF included (spec §2.1, the ``UNKNOWN`` worst case)."""

MAX_V2_LENGTH: Final = 4096
"""Our limit on a v2 header's declared length (the spec allows 65535).

Every real sender stays far below it (HAProxy's SSL TLVs are a few hundred
bytes) and it bounds what one connection can make us buffer.
"""

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"  # spec §2.2

# TLV types we name (spec §2.2); every TLV is handed to the caller anyway.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05

_V2_FIXED = 16  # signature, ver/cmd, family/transport, length (spec §2.2)
_TLV_HEAD = 3  # type, length_hi, length_lo (spec §2.2)

# The family/transport byte -> the size of its address block (spec §2.2, "In
# practice, the following protocol bytes are expected"). Anything else "must
# be rejected as invalid by receivers".
_V2_BLOCK: Final = {
    0x00: 0,  # UNSPEC
    0x11: 12,  # TCP over IPv4
    0x12: 12,  # UDP over IPv4
    0x21: 36,  # TCP over IPv6
    0x22: 36,  # UDP over IPv6
    0x31: 216,  # UNIX stream
    0x32: 216,  # UNIX datagram
}
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21
_V2_LOCAL = 0x0
_V2_PROXY = 0x1


class ProxyCommand(StrEnum):
    """What a header says about the connection (spec §2.2, the command nibble)."""

    #: Relayed on behalf of a client (every v1 header says ``PROXY``).
    PROXY = "PROXY"
    #: Opened by the proxy itself, e.g. a health check: keep the socket's addresses.
    LOCAL = "LOCAL"


class ProxyProtocolError(Exception):
    """A PROXY header was refused; ``reason`` says why, in a few words for a log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class ProxyHeader:
    """One parsed PROXY header.

    Attributes:
      version: 1 (text) or 2 (binary).
      command: `ProxyCommand.PROXY`, or `ProxyCommand.LOCAL` (v2 only).
      source: the real client as ``(ip, port)``; ``None`` when the socket's own
          addresses stand (v1 ``UNKNOWN``; v2 ``LOCAL``; v2 UDP, UNIX or
          UNSPEC, which a TCP echo cannot use).
      destination: the address the client connected to, or ``None`` with
          ``source``.
      tlvs: the v2 TLVs as ``(type, value)`` in wire order, unknown types and
          the checksum included; ``()`` for v1 and for ``LOCAL``, whose bytes
          are skipped unread (spec §2.2).
      length: the header's size in bytes.
      rest: the bytes that followed the header in the data fed so far; they
          belong to whatever comes next and must not be lost.

    """

    version: Literal[1, 2]
    command: ProxyCommand
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...]
    length: int
    rest: bytes = attrs.field(repr=lambda rest: f"<{len(rest)} bytes>")


class ProxyParser:
    """Parse the one PROXY header that starts a connection.

    Args:
      accept: ``"v1"``, ``"v2"`` or ``"any"`` (either). The header is never
          optional: a connection that starts with anything else is refused,
          because an optional header lets any client claim any address
          (spec §5).

    Feed it with `feed` until it returns the header; then it is done, and
    ``header.rest`` is the start of the payload. At end of input call
    `feed_eof`. Once it has refused, every call refuses again.

    """

    __slots__ = (
        "_accept",
        "_buf",
        "_crc_at",
        "_done",
        "_error",
        "_tlv_at",
        "_total",
        "_version",
    )

    def __init__(self, accept: Accept) -> None:
        if accept not in ("v1", "v2", "any"):
            raise ValueError(f"accept must be 'v1', 'v2' or 'any', not {accept!r}")
        self._accept = accept
        self._buf = bytearray()
        self._version = 0  # 1 or 2 once the first byte has told
        self._error: str | None = None
        self._done = False
        self._total = 0  # v2: the whole header's size, once its length field is in
        self._tlv_at = 0  # v2 PROXY: where the next unchecked TLV starts
        self._crc_at = 0  # v2: where the CRC32C value sits, 0 if none

    @property
    def pending(self) -> int:
        """How many bytes of an unfinished header are buffered."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> ProxyHeader | None:
        """Add ``data``; return the header once it is complete, else ``None``.

        Bytes after the header are never interpreted: they come back as the
        header's ``rest``. An empty ``data`` is allowed and changes nothing
        (end of input is `feed_eof`).

        Raises:
          ProxyProtocolError: the bytes so far cannot begin a valid header;
              and on every call after that.
          RuntimeError: the header was already returned; what follows it is
              payload, not for this parser.

        """
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        if self._done:
            raise RuntimeError("the PROXY header is already parsed; the rest is payload")
        try:
            header = self._feed(data)
        except ProxyProtocolError as exc:
            self._error = exc.reason
            self._buf = bytearray()
            raise
        if header is not None:
            self._done = True
            self._buf = bytearray()
        return header

    def feed_eof(self) -> None:
        """The peer closed its side. Refuses unless the header was complete.

        Raises:
          ProxyProtocolError: the input ended before a whole header (spec
              §2.2: a receiver "must also reject ... partial protocol
              headers"), or the parser had already refused.

        """
        if self._error is None and not self._done:
            self._error = (
                "connection closed inside the PROXY header"
                if self._buf
                else "connection closed before a PROXY header"
            )
            self._buf = bytearray()
        if self._error is not None:
            raise ProxyProtocolError(self._error)

    def _feed(self, data: bytes | bytearray) -> ProxyHeader | None:
        if not data:
            return None
        if not self._version:
            self._version = self._which_version(data[0])
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    def _which_version(self, first: int) -> int:
        # The first byte decides (spec §2.2 end: v2 starts "\r", v1 "PROXY"),
        # so a wrong protocol is refused on its first byte.
        if first == V2_SIGNATURE[0]:
            if self._accept == "v1":
                raise ProxyProtocolError("PROXY v2 header where only v1 is accepted")
            return 2
        if first == ord("P"):
            if self._accept == "v2":
                raise ProxyProtocolError("PROXY v1 header where only v2 is accepted")
            return 1
        raise ProxyProtocolError("not a PROXY protocol header")

    # -- v1 ------------------------------------------------------------------

    def _feed_v1(self, data: bytes | bytearray) -> ProxyHeader | None:
        buf = self._buf
        room = MAX_V1_LINE - len(buf)
        buf += data[:room]
        lf = buf.find(b"\n")
        cr = buf.find(b"\r")
        # Spec §2.1: "The receiver must not tolerate a single CR or LF character
        # to end the line". The first CR must be the one right before the first
        # LF; any other is bare, wherever it sits (we never let a lenient
        # parser further on split this line differently).
        if lf >= 0:
            if cr < 0 or cr > lf:
                raise ProxyProtocolError("PROXY v1: bare LF")
            if cr != lf - 1:
                raise ProxyProtocolError("PROXY v1: bare CR")
            text = bytes(buf[:cr])
            problem = _v1_problem(text, complete=True)
            if problem:
                raise ProxyProtocolError(problem)
            end = lf + 1
            return _v1_header(text, end, bytes(buf[end:]) + bytes(data[room:]))
        if cr >= 0 and cr != len(buf) - 1:
            raise ProxyProtocolError("PROXY v1: bare CR")
        # The earliest the line can end is with the next byte (after a CR) or
        # the one after; past 107 bytes it cannot be valid any more.
        earliest_end = len(buf) + (1 if cr >= 0 else 2)
        if earliest_end > MAX_V1_LINE:
            raise ProxyProtocolError(f"PROXY v1: no CRLF within {MAX_V1_LINE} bytes")
        problem = _v1_problem(bytes(buf[:cr] if cr >= 0 else buf), complete=cr >= 0)
        if problem:
            raise ProxyProtocolError(problem)
        return None

    # -- v2 ------------------------------------------------------------------

    def _feed_v2(self, data: bytes | bytearray) -> ProxyHeader | None:
        buf = self._buf
        view = memoryview(data)
        used = 0
        if len(buf) < _V2_FIXED:
            used = min(_V2_FIXED - len(buf), len(view))
            buf += view[:used]
            self._check_v2_fixed()
            if len(buf) < _V2_FIXED:
                return None
        take = min(self._total - len(buf), len(view) - used)
        buf += view[used : used + take]
        used += take
        if buf[12] & 0x0F == _V2_PROXY:
            self._check_tlvs()
        if len(buf) < self._total:
            return None
        return self._v2_header(bytes(view[used:]))

    def _check_v2_fixed(self) -> None:
        """Check the first 16 bytes as far as they have arrived (spec §2.2)."""
        buf = self._buf
        have = len(buf)
        if buf[:12] != V2_SIGNATURE[:have]:
            raise ProxyProtocolError("not a PROXY protocol v2 signature")
        if have > 12:
            if buf[12] >> 4 != 2:
                raise ProxyProtocolError("PROXY v2: version is not 2")
            if buf[12] & 0x0F not in (_V2_LOCAL, _V2_PROXY):
                raise ProxyProtocolError("PROXY v2: unknown command")
        if have > 13 and buf[13] not in _V2_BLOCK:
            # Refused under LOCAL as well: the spec says such values "must be
            # rejected", and every sender puts UNSPEC there for LOCAL.
            raise ProxyProtocolError("PROXY v2: unknown address family or transport")
        if have == _V2_FIXED:
            length = int.from_bytes(buf[14:16], "big")
            if length > MAX_V2_LENGTH:
                raise ProxyProtocolError(f"PROXY v2: length over {MAX_V2_LENGTH}")
            block = _V2_BLOCK[buf[13]]
            if buf[12] & 0x0F == _V2_PROXY and length < block:
                # CVE-2019-14243: an address block cut short by the length.
                raise ProxyProtocolError("PROXY v2: length shorter than the address block")
            self._total = _V2_FIXED + length
            self._tlv_at = _V2_FIXED + block

    def _check_tlvs(self) -> None:
        """Walk the TLVs that have arrived, refusing one that cannot fit.

        Remembers where it stopped, so a header trickled in byte by byte is
        walked once (h11's receive buffer does the same for lines).
        """
        buf, total = self._buf, self._total
        at = self._tlv_at
        while at < total:
            if total - at < _TLV_HEAD:
                raise ProxyProtocolError("PROXY v2: bytes after the last TLV")
            if len(buf) < at + _TLV_HEAD:
                break
            kind = buf[at]
            size = int.from_bytes(buf[at + 1 : at + 3], "big")
            if at + _TLV_HEAD + size > total:
                raise ProxyProtocolError("PROXY v2: TLV runs past the end of the header")
            if kind == PP2_TYPE_CRC32C:
                # spec §2.2.3: "a 32-bit number"; HAProxy refuses any other size.
                if size != 4:
                    raise ProxyProtocolError("PROXY v2: CRC32C TLV is not 4 bytes")
                if self._crc_at:
                    raise ProxyProtocolError("PROXY v2: more than one CRC32C TLV")
                self._crc_at = at + _TLV_HEAD
            at += _TLV_HEAD + size
        self._tlv_at = at

    def _v2_header(self, rest: bytes) -> ProxyHeader:
        buf = bytes(self._buf)
        if buf[12] & 0x0F == _V2_LOCAL:
            # spec §2.2: LOCAL "must use the real connection endpoints and
            # discard the protocol block"; the length is skipped unread.
            return ProxyHeader(2, ProxyCommand.LOCAL, None, None, (), len(buf), rest)
        if self._crc_at:
            at = self._crc_at
            # spec §2.2.3: the CRC of the whole header with its own field zeroed.
            crc = crc32c(buf[at + 4 :], crc32c(b"\x00\x00\x00\x00", crc32c(buf[:at])))
            if crc != int.from_bytes(buf[at : at + 4], "big"):
                raise ProxyProtocolError("PROXY v2: CRC32C mismatch")
        family = buf[13]
        block = _V2_BLOCK[family]
        source = destination = None
        if family in (_V2_TCP4, _V2_TCP6):
            size = 4 if family == _V2_TCP4 else 16
            addresses = buf[_V2_FIXED : _V2_FIXED + block]
            source = (_ip_text(addresses[:size]), int.from_bytes(addresses[-4:-2], "big"))
            destination = (
                _ip_text(addresses[size : 2 * size]),
                int.from_bytes(addresses[-2:], "big"),
            )
        tlvs = []
        at = _V2_FIXED + block
        while at < len(buf):  # already checked to tile exactly
            size = int.from_bytes(buf[at + 1 : at + 3], "big")
            tlvs.append((buf[at], buf[at + _TLV_HEAD : at + _TLV_HEAD + size]))
            at += _TLV_HEAD + size
        return ProxyHeader(2, ProxyCommand.PROXY, source, destination, tuple(tlvs), len(buf), rest)


# -- v1 fields -----------------------------------------------------------------

# Spec §2.1: IPv4 as exactly 4 decimal numbers 0-255, no leading zeros ("to
# avoid any possible confusion with octal numbers"). Matched here rather than
# left to ipaddress, whose leading-zero check only arrived in 3.9.5.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rb"(?:%s\.){3}%s" % (_OCTET, _OCTET))
# Every prefix of a valid octet is a valid octet or empty, so this is exactly
# the set of prefixes of valid addresses.
_IPV4_PREFIX = re.compile(rb"(?:%s\.){0,3}%s?" % (_OCTET, _OCTET))
# Hex digits, colons and the dots of a trailing IPv4 part; nothing else, so
# no zone ("%eth0"), no space, no sign. 45 is the longest IPv6 text form
# ("ffff:" * 6 + "255.255.255.255").
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{1,45}")
# Spec §2.1: ports in decimal 0-65535, no leading zeros; like octets, every
# prefix of a valid port is a valid port.
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
# Whatever a prefix of a valid IPv6 text still lacks, one of these supplies
# it: finish the hextet and close with "::" or nothing, add the one ":" or
# "0" a dangling colon needs, or finish a dotted IPv4 tail. So a prefix is
# viable exactly when one of them completes it (tests check this against
# every prefix of many addresses).
_IPV6_COMPLETIONS = (b"", b"::", b":", b"0", b".0", b".0.0", b"0.0", b"0.0.0")
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")


def _v1_problem(text: bytes, *, complete: bool) -> str | None:
    """Why ``text`` cannot start (or, if ``complete``, be) a v1 line; ``None`` if it can.

    ``text`` excludes the CRLF. Fields are split on single spaces, so a double
    space shows up as an empty field and is refused like any bad field.
    """
    fields = text.split(b" ")
    last = len(fields) - 1
    for i, field in enumerate(fields):
        whole = complete or i < last
        if i == 0:
            if not (field == b"PROXY" if whole else b"PROXY".startswith(field)):
                return "not a PROXY protocol header"
        elif i == 1:
            if field == b"UNKNOWN":
                # Spec §2.1: for UNKNOWN "the receiver must ignore anything
                # presented before the CRLF".
                return None
            if not (
                field in _V1_PROTOCOLS if whole else any(p.startswith(field) for p in _V1_PROTOCOLS)
            ):
                return "PROXY v1: protocol is not TCP4, TCP6 or UNKNOWN"
        elif i > 5:
            return "PROXY v1: too many fields"
        elif i < 4:
            v6 = fields[1] == b"TCP6"
            if not _v1_address_ok(field, v6=v6, whole=whole):
                which = "source" if i == 2 else "destination"
                return f"PROXY v1: bad {which} address for {fields[1].decode()}"
        elif not (_port_ok(field) if whole else not field or _port_ok(field)):
            return f"PROXY v1: bad {'source' if i == 4 else 'destination'} port"
    if complete and last < 5:
        return "PROXY v1: missing fields"
    return None


def _v1_address_ok(field: bytes, *, v6: bool, whole: bool) -> bool:
    if not v6:
        return bool((_IPV4 if whole else _IPV4_PREFIX).fullmatch(field))
    if whole:
        return _ipv6_ok(field)
    return not field or any(_ipv6_ok(field + tail) for tail in _IPV6_COMPLETIONS)


def _ipv6_ok(text: bytes) -> bool:
    if not _IPV6_CHARS.fullmatch(text):
        return False
    if b"." in text and not _IPV4.fullmatch(text.rpartition(b":")[2]):
        return False
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        return False
    return True


def _port_ok(field: bytes) -> bool:
    return bool(_PORT.fullmatch(field)) and int(field) <= 0xFFFF


def _v1_header(text: bytes, length: int, rest: bytes) -> ProxyHeader:
    """Build the header of a line `_v1_problem` has passed as complete."""
    fields = text.split(b" ")
    if fields[1] == b"UNKNOWN":
        return ProxyHeader(1, ProxyCommand.PROXY, None, None, (), length, rest)
    source = (str(ipaddress.ip_address(fields[2].decode())), int(fields[4]))
    destination = (str(ipaddress.ip_address(fields[3].decode())), int(fields[5]))
    return ProxyHeader(1, ProxyCommand.PROXY, source, destination, (), length, rest)


def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


# -- CRC32C ----------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            # 0x82F63B78: the Castagnoli polynomial, bit-reflected (RFC 4960 App. B).
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from a previous ``crc``.

    Table-driven pure Python: a v2 header is at most a few KiB and the check
    runs once per connection, so a C extension would not pay for itself.
    ``crc32c(b"123456789") == 0xE3069283``, the standard check value.
    """
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_crc = crc32c  # encode_v2's keyword argument shadows the function inside it


# -- encoders --------------------------------------------------------------------


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 line naming ``source`` as the client; both ``None`` gives ``UNKNOWN``.

    Raises:
      ValueError: one address without the other, addresses of two families,
          an IPv6 zone, or a port outside 0-65535.

    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _pair(source, destination)
    protocol = "TCP4" if src[0].version == 4 else "TCP6"
    return f"PROXY {protocol} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None,
    *,
    command: ProxyCommand = ProxyCommand.PROXY,
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc32c: bool = False,
) -> bytes:
    """A v2 header: TCP over the addresses' family, then ``tlvs`` in order.

    Args:
      source, destination: the client and the address it reached. Both
          ``None`` gives family UNSPEC (the receiver keeps its own addresses);
          `ProxyCommand.LOCAL` (a health check) takes no addresses.
      command: `ProxyCommand.PROXY` or `ProxyCommand.LOCAL`.
      tlvs: ``(type, value)`` pairs, type 0-255.
      crc32c: append a ``PP2_TYPE_CRC32C`` TLV over the whole header.

    Raises:
      ValueError: as `encode_v1`; addresses with ``LOCAL``; a bad TLV; or a
          header longer than `MAX_V2_LENGTH` after the fixed 16 bytes.

    """
    if source is None and destination is None:
        family, block = 0x00, b""
    elif command is ProxyCommand.LOCAL:
        raise ValueError("a LOCAL header carries no addresses")
    else:
        src, dst = _pair(source, destination)
        family = _V2_TCP4 if src[0].version == 4 else _V2_TCP6
        block = b"".join(
            (src[0].packed, dst[0].packed, src[1].to_bytes(2, "big"), dst[1].to_bytes(2, "big"))
        )
    body = bytearray(block)
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"bad TLV: type {kind}, {len(value)} bytes")
        body += bytes((kind,)) + len(value).to_bytes(2, "big") + value
    if crc32c:
        body += bytes((PP2_TYPE_CRC32C,)) + b"\x00\x04" + b"\x00\x00\x00\x00"
    if len(body) > MAX_V2_LENGTH:
        raise ValueError(f"a v2 header's length is at most {MAX_V2_LENGTH}")
    verb = _V2_LOCAL if command is ProxyCommand.LOCAL else _V2_PROXY
    header = V2_SIGNATURE + bytes((0x20 | verb, family)) + len(body).to_bytes(2, "big") + body
    if crc32c:
        # The checksum field is the last 4 bytes and still zero (spec §2.2.3).
        header = header[:-4] + _crc(header).to_bytes(4, "big")
    return header


_IPPort = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _pair(source: Address | None, destination: Address | None) -> tuple[_IPPort, _IPPort]:
    if source is None or destination is None:
        raise ValueError("give both addresses, or neither")
    src, dst = _checked(source), _checked(destination)
    if src[0].version != dst[0].version:
        raise ValueError("source and destination must be of one address family")
    return src, dst


def _checked(address: Address) -> _IPPort:
    host, port = address
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise ValueError(f"{host!r}: a zone id means nothing to the receiver")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is outside 0-65535")
    return ip, port


# -- the stage -------------------------------------------------------------------

# One receive while reading the header. Whatever arrives beyond the header
# is the next stage's (`Link.pending`), so there is no need to read less.
_RECEIVE_SIZE = 65536

_ACCEPT: Final[dict[ProxyProtocol, Accept]] = {
    ProxyProtocol.V1: "v1",
    ProxyProtocol.V2: "v2",
    ProxyProtocol.ANY: "any",
}


class ProxyStage(Stage):
    """The pipeline stage that reads the PROXY header every connection starts with.

    Args:
      accept: which header versions to take (``"v1"``, ``"v2"``, ``"any"``);
          a header is never optional.
      trusted: the networks whose peers may send a header (the load
          balancers); any other IP peer is refused with ``proxy_untrusted``
          before a byte is read. A peer with no IP address (an ``AF_UNIX``
          socket, a stream handed to `echosvc.handle_stream` without an
          address) is not subject to the list: who may reach it is decided
          by file permissions or by the caller.
      timeout: seconds for the whole header (``proxy_timeout``); ``0``: none.

    What the next stage gets: a header naming a TCP client (``PROXY TCP4``,
    ``TCP6``; v2 ``PROXY`` over TCP) makes that client the link's ``peer``
    and ``address`` (an IPv4-mapped IPv6 client becomes plain IPv4, for the
    logs and the per-source limit alike); a header that keeps the socket's
    own addresses (v1 ``UNKNOWN``, v2 ``LOCAL`` health checks, v2 UDP, UNIX
    or UNSPEC) keeps them. Either way the link gains the ``proxy`` field,
    the load balancer's ``host:port`` (the ``peer`` it arrived with, if it
    had one): every connection that got past a PROXY listener's header
    names the balancer that vouched for it, and ``peer == proxy`` marks the
    balancer's own connections. The bytes after the header are the link's
    ``pending``.

    A refusal's ``detail`` is the parser's reason. The stage holds no state
    of its own, so one instance serves every connection.
    """

    timeout_reason = CloseReason.PROXY_TIMEOUT

    def __init__(self, accept: Accept, trusted: Sequence[IPNetwork], timeout: float) -> None:
        if accept not in ("v1", "v2", "any"):
            raise ValueError(f"accept must be 'v1', 'v2' or 'any', not {accept!r}")
        self.accept = accept
        self.trusted = tuple(trusted)
        self.timeout = timeout

    @classmethod
    def from_config(cls, config: Config) -> ProxyStage:
        """The stage ``--proxy-protocol``, ``--proxy-trusted`` and ``--proxy-timeout`` ask for."""
        return cls(_ACCEPT[config.proxy_protocol], config.proxy_trusted, config.proxy_timeout)

    def trusts(self, address: tuple[Any, ...] | str | None) -> bool:
        """Whether a peer at socket address ``address`` may send a header."""
        ip = address_ip(address)
        return ip is None or any(ip in network for network in self.trusted)

    async def open(self, link: Link) -> Link:
        # Before any receive: an untrusted peer's bytes are never looked at.
        if not self.trusts(link.address):
            raise Refused(CloseReason.PROXY_UNTRUSTED, "peer is not a trusted proxy")
        parser = ProxyParser(self.accept)
        data: bytes | bytearray = link.pending
        try:
            while (header := parser.feed(data)) is None:
                data = await link.stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    parser.feed_eof()  # the header is unfinished: this refuses
        except ProxyProtocolError as exc:
            raise Refused(CloseReason.PROXY_INVALID, exc.reason) from None
        opened = link.evolve(pending=header.rest)
        if header.source is not None:
            host, port = header.source
            ip = address_ip((host, port))
            assert ip is not None, "the parser only returns IP addresses"
            # Shaped like accept()'s own addresses: (host, port) for IPv4,
            # (host, port, flowinfo, scope_id) for IPv6.
            address = (str(ip), port) if ip.version == 4 else (str(ip), port, 0, 0)
            opened = opened.evolve(peer=format_address(address), address=address)
        if link.peer is not None:
            opened = opened.with_field("proxy", link.peer)
        return opened
