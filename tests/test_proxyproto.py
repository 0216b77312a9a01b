"""The sans-IO PROXY protocol parser and encoder: pure, so tested exhaustively.

Vectors from outside this code base, so the parser and encoder are not only
checked against each other: the example line of HAProxy's
``doc/proxy-protocol.txt`` §2.1; a ``send-proxy-v2`` header captured from
HAProxy (seriousben/experiment-proxy-protocol, README); HAProxy's own
``reg-tests/connection/proxy_protocol_tlv_validation.vtc``; an AWS Network
Load Balancer header with a CRC32C TLV (aws/elastic-load-balancing-tools,
``Compatibility_AwsNetworkLoadBalancerTest.java``); and the request that
crashed mastercactapus/proxyprotocol (CVE-2019-14243, caddy-proxyprotocol#8).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from echosvc.proxyproto import (
    MAX_V1_LINE,
    MAX_V2_LENGTH,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    V2_SIGNATURE,
    Accept,
    Address,
    ProxyCommand,
    ProxyHeader,
    ProxyParser,
    ProxyProtocolError,
    crc32c,
    encode_v1,
    encode_v2,
)

PROXY = ProxyCommand.PROXY
LOCAL = ProxyCommand.LOCAL

# -- helpers ---------------------------------------------------------------------

Outcome = tuple[str, ProxyHeader | str | None]


def run(chunks: list[bytes], accept: Accept = "any") -> Outcome:
    """Feed ``chunks`` in order: ``("header", h)``, ``("error", reason)`` or ``("need", None)``.

    A header's ``rest`` is extended with the chunks not fed after it, so any
    chunking of the same bytes must give an equal outcome. Any exception but
    the parser's own escapes and fails the test.
    """
    parser = ProxyParser(accept)
    try:
        for i, chunk in enumerate(chunks):
            header = parser.feed(chunk)
            if header is not None:
                rest = header.rest + b"".join(chunks[i + 1 :])
                return "header", attrs.evolve(header, rest=rest)
            assert parser.pending <= (MAX_V1_LINE if chunks[0][:1] == b"P" else 16 + 4096)
    except ProxyProtocolError as exc:
        return "error", exc.reason
    return "need", None


def parse(data: bytes, accept: Accept = "any") -> ProxyHeader:
    header = ProxyParser(accept).feed(data)
    assert header is not None
    return header


def refusal(data: bytes, accept: Accept = "any") -> str:
    """The reason ``data`` (fed whole) is refused; fails if it is not refused."""
    with pytest.raises(ProxyProtocolError) as info:
        ProxyParser(accept).feed(data)
    return info.value.reason


def need_more(data: bytes, accept: Accept = "any") -> None:
    assert ProxyParser(accept).feed(data) is None


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def v2(
    command: int = 0x21, family: int = 0x11, body: bytes = b"", length: int | None = None
) -> bytes:
    """A raw v2 header, built by hand so it can be wrong on purpose."""
    declared = len(body) if length is None else length
    return V2_SIGNATURE + bytes((command, family)) + declared.to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + len(value).to_bytes(2, "big") + value


IPV4_BLOCK = bytes((10, 0, 0, 1, 10, 0, 0, 2, 0x1F, 0x90, 0x00, 0x50))  # 10.0.0.1:8080 -> :80

# -- independent vectors -----------------------------------------------------------

SPEC_V1_EXAMPLE = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"  # spec §2.1
HAPROXY_V2_CAPTURE = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")
HAPROXY_REGTEST_C1 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a 21 11 0014 7F000001 7F000001 002A 0539 02 0005 3132333435"
)
AWS_NLB_PRIVATELINK = bytes.fromhex(
    "0d0a0d0a000d0a515549540a 21 11 0054 ac1f0771 ac1f0a1f c8f2 0050"
    " 03 0004 e8d6892d"
    " ea 0017 01 7670 63652d30 38643262 66313566 61633530 303163 39"
    " 04 0024"
) + bytes(36)


def test_the_spec_example_line() -> None:
    header = parse(SPEC_V1_EXAMPLE + b"GET / HTTP/1.1\r\n")
    assert header == ProxyHeader(
        1, PROXY, ("192.168.0.1", 56324), ("192.168.0.11", 443), (), 47, b"GET / HTTP/1.1\r\n"
    )
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == SPEC_V1_EXAMPLE


def test_a_header_haproxy_sent() -> None:
    header = parse(HAPROXY_V2_CAPTURE + b"GET / HTTP/1.1\r\n")
    assert header.source == ("172.19.0.1", 42578)
    assert header.destination == ("172.19.0.3", 80)
    assert (header.version, header.command, header.tlvs, header.length) == (2, PROXY, (), 28)
    assert header.rest == b"GET / HTTP/1.1\r\n"
    assert encode_v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == HAPROXY_V2_CAPTURE


def test_haproxy_regtests_for_tlv_validation() -> None:
    # c1: valid, an AUTHORITY TLV
    header = parse(HAPROXY_REGTEST_C1)
    assert header.source == ("127.0.0.1", 42)
    assert header.destination == ("127.0.0.1", 1337)
    assert header.tlvs == ((PP2_TYPE_AUTHORITY, b"12345"),)
    assert (
        encode_v2(("127.0.0.1", 42), ("127.0.0.1", 1337), tlvs=[(PP2_TYPE_AUTHORITY, b"12345")])
        == HAPROXY_REGTEST_C1
    )
    # c2: a TLV after the declared length is payload
    after = tlv(PP2_TYPE_AUTHORITY, b"54321")
    assert parse(HAPROXY_REGTEST_C1 + after).rest == after
    # c3: a TLV longer than the header
    addresses = bytes.fromhex("7F000001 7F000001 002A 0539")
    c3 = v2(body=addresses + bytes.fromhex("02 000A 31323334353132333435"), length=20)
    assert "past the end" in refusal(c3)
    # c4: TLVs that stop short of the declared length
    c4 = v2(body=addresses + bytes.fromhex("02 0004 31323334"), length=20)
    assert "after the last TLV" in refusal(c4)


def test_an_aws_nlb_header_with_its_crc32c() -> None:
    header = parse(AWS_NLB_PRIVATELINK)
    assert header.source == ("172.31.7.113", 51442)
    assert header.destination == ("172.31.10.31", 80)
    assert header.tlvs == (
        (PP2_TYPE_CRC32C, bytes.fromhex("e8d6892d")),
        (0xEA, b"\x01vpce-08d2bf15fac5001c9"),
        (PP2_TYPE_NOOP, bytes(36)),
    )
    tampered = AWS_NLB_PRIVATELINK.replace(b"vpce-08", b"vpce-09")
    assert refusal(tampered) == "PROXY v2: CRC32C mismatch"


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the catalogue's check value for CRC-32C
    assert crc32c(b"") == 0
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283


def test_cve_2019_14243_truncated_address_block() -> None:
    # The exact bytes of caddy-proxyprotocol#8: PROXY, UDP over IPv4, length 0.
    probe = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a\x21\x12\x00\x00"
    assert refusal(probe) == "PROXY v2: length shorter than the address block"


# -- any chunking, same result --------------------------------------------------

OCTETS = st.integers(0, 255)
PORTS = st.integers(0, 65535)
HEXTETS = st.lists(
    st.sampled_from([0, 0, 0, 1, 0xFFFF]) | st.integers(0, 0xFFFF), min_size=8, max_size=8
)
IPV6 = HEXTETS.map(
    lambda hs: ipaddress.IPv6Address(
        int.from_bytes(b"".join(h.to_bytes(2, "big") for h in hs), "big")
    )
)
IPV4 = st.ip_addresses(v=4)


@st.composite
def ipv6_text(draw: st.DrawFn) -> tuple[str, str]:
    """An IPv6 address as a sender may write it, and as the parser should report it."""
    ip = draw(IPV6)
    form = draw(st.sampled_from(["compressed", "exploded", "upper", "dotted"]))
    if form == "compressed":
        text = ip.compressed
    elif form == "exploded":
        text = ip.exploded
    elif form == "upper":
        text = ip.compressed.upper()
    else:  # the IPv4-mapped style inet_ntop writes, "::ffff:1.2.3.4"
        six = ip.exploded.split(":")[:6]
        text = ":".join(six) + ":" + str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return text, str(ip)


@st.composite
def v1_lines(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v1 line and the header it stands for (with an empty ``rest``)."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        tail = draw(
            st.binary(max_size=MAX_V1_LINE - 16).map(
                lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
            )
        )
        line = b"PROXY UNKNOWN" + (b" " + tail if draw(st.booleans()) else b"") + b"\r\n"
        return line, ProxyHeader(1, PROXY, None, None, (), len(line), b"")
    if kind == "TCP4":
        ips = [draw(IPV4), draw(IPV4)]
        texts = [(str(ip), str(ip)) for ip in ips]
    else:
        texts = [draw(ipv6_text()), draw(ipv6_text())]
    sport, dport = draw(PORTS), draw(PORTS)
    line = f"PROXY {kind} {texts[0][0]} {texts[1][0]} {sport} {dport}\r\n".encode()
    assume(len(line) <= MAX_V1_LINE)  # exploded IPv6 with a dotted tail can exceed it
    header = ProxyHeader(1, PROXY, (texts[0][1], sport), (texts[1][1], dport), (), len(line), b"")
    return line, header


TLVS = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != PP2_TYPE_CRC32C), st.binary(max_size=40)),
    max_size=4,
)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v2 header from the encoder, and the header it stands for."""
    command = draw(st.sampled_from([PROXY, PROXY, LOCAL]))
    tlvs = draw(TLVS)
    crc = draw(st.booleans())
    if command is LOCAL:
        data = encode_v2(None, None, command=LOCAL, tlvs=tlvs, crc32c=crc)
        return data, ProxyHeader(2, LOCAL, None, None, (), len(data), b"")
    family = draw(st.sampled_from(["unspec", "ipv4", "ipv6"]))
    source: Address | None = None
    destination: Address | None = None
    if family != "unspec":
        ips = IPV4 if family == "ipv4" else IPV6
        source = (str(draw(ips)), draw(PORTS))
        destination = (str(draw(ips)), draw(PORTS))
    data = encode_v2(source, destination, tlvs=tlvs, crc32c=crc)
    parsed = (*tlvs, (PP2_TYPE_CRC32C, data[-4:])) if crc else tuple(tlvs)
    return data, ProxyHeader(2, PROXY, source, destination, parsed, len(data), b"")


HEADERS = v1_lines() | v2_headers()
PAYLOAD = st.binary(max_size=60)
CUTS = st.lists(st.integers(0, 5000), max_size=12)


@settings(max_examples=100)
@given(HEADERS, PAYLOAD, CUTS)
def test_any_chunking_gives_the_same_header(
    sample: tuple[bytes, ProxyHeader], payload: bytes, cuts: list[int]
) -> None:
    data, expected = sample
    expected = attrs.evolve(expected, rest=payload)
    assert run([data + payload]) == ("header", expected)
    assert run(chunked(data + payload, cuts)) == ("header", expected)


@settings(max_examples=40)
@given(HEADERS, PAYLOAD)
def test_byte_at_a_time_and_every_split_in_two(
    sample: tuple[bytes, ProxyHeader], payload: bytes
) -> None:
    data, expected = sample
    expected = attrs.evolve(expected, rest=payload)
    whole = data + payload
    assert run([whole[i : i + 1] for i in range(len(whole))]) == ("header", expected)
    for cut in range(len(whole) + 1):
        assert run([whole[:cut], whole[cut:]]) == ("header", expected)


@settings(max_examples=50)
@given(HEADERS, PAYLOAD)
def test_the_encoders_round_trip(sample: tuple[bytes, ProxyHeader], payload: bytes) -> None:
    data, expected = sample
    if expected.version == 1:
        assert (
            parse(encode_v1(expected.source, expected.destination) + payload).source
            == expected.source
        )
    else:
        header = parse(data + payload)
        assert (header.source, header.destination, header.rest) == (
            expected.source,
            expected.destination,
            payload,
        )


# -- mutations: a header or our own refusal, never anything else ------------------

MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0, 5000), OCTETS),
    min_size=1,
    max_size=4,
)
INTERESTING = (
    b"\r\n :.0123456789abfPROXYTCP46UNKOWN\x00\x01\x02\x03\x04\x11\x12\x20\x21\x22\x31\xff"
)


@settings(max_examples=250)
@given(HEADERS, PAYLOAD, MUTATIONS, CUTS, st.booleans())
def test_mutated_headers_give_a_header_or_our_refusal(
    sample: tuple[bytes, ProxyHeader],
    payload: bytes,
    mutations: list[tuple[str, int, int]],
    cuts: list[int],
    pick_interesting: bool,
) -> None:
    data = bytearray(sample[0] + payload)
    for op, where, value in mutations:
        at = where % (len(data) + 1)
        byte = INTERESTING[value % len(INTERESTING)] if pick_interesting else value
        if op == "replace" and at < len(data):
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        elif op == "delete" and at < len(data):
            del data[at]
    data_bytes = bytes(data)
    whole = run([data_bytes])
    pieces = run(chunked(data_bytes, cuts))
    assert whole[0] == pieces[0]
    if whole[0] == "header":
        assert whole == pieces
        header = whole[1]
        assert isinstance(header, ProxyHeader)
        # Exactly the header is consumed: rest is every byte after it.
        assert header.rest == data_bytes[header.length :]
        assert header.length <= (MAX_V1_LINE if header.version == 1 else 16 + MAX_V2_LENGTH)


# -- v1 boundaries --------------------------------------------------------------

GOOD4 = "PROXY TCP4 1.2.3.4 5.6.7.8 1000 80\r\n"
GOOD6 = "PROXY TCP6 2001:db8::1 ::1 1000 80\r\n"


@pytest.mark.parametrize(
    "line",
    [
        GOOD4,
        GOOD6,
        "PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        "PROXY TCP6 2001:DB8::1 ::1 1000 80\r\n",
        "PROXY TCP6 ::ffff:1.2.3.4 ::1 1000 80\r\n",
        "PROXY TCP6 1:2:3:4:5:6:7:: :: 1000 80\r\n",
        "PROXY TCP6 " + ":".join(["ffff"] * 8) + " " + ":".join(["ffff"] * 8) + " 65535 65535\r\n",
        "PROXY UNKNOWN\r\n",
        "PROXY UNKNOWN \r\n",
        "PROXY UNKNOWN 1.2.3.4 5.6.7.8 1000 80\r\n",
        "PROXY UNKNOWN anything at all, even +80 and fe80::1%eth0\r\n",
    ],
)
def test_valid_v1_lines(line: str) -> None:
    header = parse(line.encode() + b"payload")
    assert (header.length, header.rest) == (len(line), b"payload")


def test_v1_addresses_come_back_in_canonical_form() -> None:
    header = parse(b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::FFFF:1.2.3.4 1 2\r\n")
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == (str(ipaddress.IPv6Address("::ffff:1.2.3.4")), 2)
    assert parse(b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n").source is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        # leading zeros, signs, underscores, spaces and the like in ports
        ("PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 00 80\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 +80 80\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 -1 80\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1_0 80\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 0_80 80\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 \t80 80\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 80 65536\r\n", "bad destination port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 80 0x50\r\n", "bad destination port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 80 ٨٠\r\n", "bad destination port"),
        # leading zeros and ranges in IPv4
        ("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad source address"),
        ("PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n", "bad destination address"),
        ("PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad source address"),
        ("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad source address"),
        ("PROXY TCP4 1.2.3.4. 5.6.7.8 1 2\r\n", "bad source address"),
        # zones, mixed families, non-canonical garbage in IPv6
        ("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad source address"),
        ("PROXY TCP6 fe80::1%25eth0 ::1 1 2\r\n", "bad source address"),
        ("PROXY TCP6 ::1 fe80::1%1 1 2\r\n", "bad destination address"),
        ("PROXY TCP4 ::1 ::1 1 2\r\n", "bad source address for TCP4"),
        ("PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "bad destination address for TCP4"),
        ("PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad source address for TCP6"),
        ("PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "bad destination address for TCP6"),
        ("PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n", "bad source address"),
        ("PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad source address"),
        ("PROXY TCP6 12345:: ::1 1 2\r\n", "bad source address"),
        ("PROXY TCP6 [::1] ::1 1 2\r\n", "bad source address"),
        # spacing and structure
        ("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        ("PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "bad source address"),
        ("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "bad destination address"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n", "bad source port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n", "bad destination port"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "too many fields"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "too many fields"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "missing fields"),
        ("PROXY TCP4\r\n", "missing fields"),
        ("PROXY\r\n", "missing fields"),
        (" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        ("PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        ("PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        ("PROXI TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        ("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        ("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        ("PROXY UNKNOWNX\r\n", "not TCP4, TCP6 or UNKNOWN"),
        ("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        # line ends
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", None),  # still waiting for its LF
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "bare CR"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r", "bare LF"),
        ("PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "bare CR"),
        ("PROXY UNKNOWN foo\rbar\r\n", "bare CR"),
        ("PROXY UNKNOWN foo\nbar\r\n", "bare LF"),
    ],
)
def test_invalid_v1_lines(line: str, reason: str | None) -> None:
    data = line.encode()
    if reason is None:
        need_more(data)
    else:
        assert reason in refusal(data)


@pytest.mark.parametrize(
    "prefix",
    [
        "G",  # an HTTP request, say
        "PROXX",
        "PROXY TCP4 01",
        "PROXY TCP4 1.2.3.4.",
        "PROXY TCP4 256",
        "PROXY TCP4 1.2.3.4 5.6.7.8 00",
        "PROXY TCP4 1.2.3.4 5.6.7.8 65536",
        "PROXY TCP6 :1",
        "PROXY TCP6 :::",
        "PROXY TCP6 1::2::",
        "PROXY TCP6 1:2:3:4:5:6:7:8:",
        "PROXY TCP6 12345",
        "PROXY TCP6 1.",
        "PROXY TCP6 ::1.2.3.4.",
        "PROXY TCP6 ::1.2.3.4:",
        "PROXY TCP6 fe80::1%",
    ],
)
def test_v1_is_refused_as_soon_as_it_cannot_become_valid(prefix: str) -> None:
    refusal(prefix.encode())  # no CRLF needed: the bytes so far already decide


@pytest.mark.parametrize(
    "prefix",
    [
        "P",
        "PROXY T",
        "PROXY UNK",
        "PROXY TCP4 1.2.3.",
        "PROXY TCP4 1.2.3.4 5.6.7.8 0",  # "0" can still end the field
        "PROXY TCP4 1.2.3.4 5.6.7.8 6553",  # and "6553" become 65535
        "PROXY TCP6 ::ffff:1.2.",
        "PROXY TCP6 1:2:3:4:5:6:7:",
        "PROXY TCP6 ::1 ::",
    ],
)
def test_a_prefix_that_may_still_become_valid_waits(prefix: str) -> None:
    need_more(prefix.encode())


def test_no_ipv6_prefix_is_refused_that_some_completion_would_make_valid() -> None:
    # The other direction of the test above, brute force over a small
    # alphabet: whatever the parser refuses really has no completion.
    alphabet = "1:."
    tails = ["".join(p) for n in range(6) for p in itertools.product(alphabet, repeat=n)]
    valid: set[str] = set()
    for text in ["".join(p) for n in range(1, 10) for p in itertools.product(alphabet, repeat=n)]:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            continue
        valid.add(text)
    for n in range(1, 5):
        for prefix in map("".join, itertools.product(alphabet, repeat=n)):
            parser = ProxyParser("v1")
            try:
                parser.feed(f"PROXY TCP6 {prefix}".encode())
            except ProxyProtocolError:
                assert not any(prefix + tail in valid for tail in tails), prefix


def test_107_byte_line_passes_and_108_does_not() -> None:
    tail = b"x" * (MAX_V1_LINE - len(b"PROXY UNKNOWN \r\n"))
    line = b"PROXY UNKNOWN " + tail + b"\r\n"
    assert len(line) == MAX_V1_LINE
    assert parse(line + b"after").rest == b"after"
    longer = b"PROXY UNKNOWN " + tail + b"y\r\n"
    assert "no CRLF within 107 bytes" in refusal(longer)
    # ... refused on its 106th byte, the first that leaves no room for CRLF.
    need_more(longer[:105])
    assert "no CRLF" in refusal(longer[:106])
    # A CR as byte 107 cannot be followed by its LF within the limit either.
    assert "no CRLF" in refusal(longer[:106] + b"\r")


def test_longest_tcp_lines_fit() -> None:
    six = ":".join(["ffff"] * 6) + ":255.255.255.255"
    line = f"PROXY TCP6 {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 116  # longer than 107: the spec's 104 counts 39-char addresses
    assert "no CRLF" in refusal(line)
    full = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert parse(line).source == (full, 65535)


def test_unbounded_v1_input_is_never_buffered() -> None:
    # CVE-2021-23351: a peer that never sends CRLF.
    parser = ProxyParser("v1")
    assert parser.feed(b"PROXY UNKNOWN ") is None
    for _ in range(10):
        assert parser.feed(b"z" * 9) is None
        assert parser.pending <= MAX_V1_LINE
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"z" * 65536)
    assert parser.pending == 0


# -- v2 boundaries ----------------------------------------------------------------


@pytest.mark.parametrize("family", range(256))
def test_each_family_and_transport_byte(family: int) -> None:
    block = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
    body = bytes(range(216)) if family in (0x31, 0x32) else IPV4_BLOCK + bytes(24)
    data = v2(family=family, body=body[: block.get(family, 36)])
    if family not in block:
        assert "unknown address family" in refusal(data[:14])  # refused on that byte
        return
    header = parse(data + b"after")
    assert header.rest == b"after"
    if family == 0x11:
        assert (header.source, header.destination) == (("10.0.0.1", 8080), ("10.0.0.2", 80))
    elif family == 0x21:
        src = str(ipaddress.IPv6Address(body[:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        assert (header.source, header.destination) == ((src, 0), (dst, 0))
    else:  # UDP, UNIX and UNSPEC keep the socket's own addresses
        assert (header.source, header.destination) == (None, None)


@pytest.mark.parametrize(
    ("family", "block"), [(0x11, 12), (0x12, 12), (0x21, 36), (0x22, 36), (0x31, 216), (0x32, 216)]
)
def test_a_length_shorter_than_the_address_block(family: int, block: int) -> None:
    data = v2(family=family, body=bytes(block - 1))
    assert "shorter than the address block" in refusal(data[:16])  # at once
    parse(v2(family=family, body=bytes(block)))


def test_v2_length_4096_passes_and_4097_does_not() -> None:
    padding = tlv(PP2_TYPE_NOOP, bytes(MAX_V2_LENGTH - len(IPV4_BLOCK) - 3))
    data = v2(body=IPV4_BLOCK + padding)
    assert parse(data).length == 16 + 4096
    too_long = v2(body=IPV4_BLOCK + padding + b"\x00", length=MAX_V2_LENGTH + 1)
    assert "length over 4096" in refusal(too_long[:16])
    assert "length over 4096" in refusal(v2(family=0x00, length=0xFFFF))


@pytest.mark.parametrize("command", [0x20, 0x21])
def test_version_and_command_nibbles(command: int) -> None:
    parse(v2(command=command, body=IPV4_BLOCK))
    for byte in range(256):
        if byte in (0x20, 0x21):
            continue
        reason = refusal(v2(command=byte, body=IPV4_BLOCK)[:13])
        assert reason == (
            "PROXY v2: version is not 2" if byte >> 4 != 2 else "PROXY v2: unknown command"
        )


def test_local_skips_its_declared_length_unread() -> None:
    # Health checks: whatever the length covers is discarded, TLV or not, and
    # the family's addresses are never believed (a LOCAL header with a full
    # TCP4 block must not let a peer pick its address).
    junk = b"\xff\x00\x01 not TLVs"
    header = parse(v2(command=0x20, family=0x00, body=junk) + b"after")
    assert header == ProxyHeader(2, LOCAL, None, None, (), 16 + len(junk), b"after")
    header = parse(v2(command=0x20, family=0x11, body=IPV4_BLOCK))
    assert (header.command, header.source, header.destination) == (LOCAL, None, None)
    parse(v2(command=0x20, family=0x11))  # a LOCAL need not carry the block
    assert "length over 4096" in refusal(v2(command=0x20, family=0x00, length=4097))
    assert "unknown address family" in refusal(v2(command=0x20, family=0x41))


def test_tlvs_must_tile_the_rest_exactly() -> None:
    two = tlv(0xE0, b"ab") + tlv(0xE1, b"")
    assert parse(v2(body=IPV4_BLOCK + two)).tlvs == ((0xE0, b"ab"), (0xE1, b""))
    assert parse(v2(family=0x00, body=two)).tlvs == ((0xE0, b"ab"), (0xE1, b""))
    for trailing in (b"\x01", b"\x01\x00"):
        data = v2(body=IPV4_BLOCK + two + trailing)
        # refused as soon as the last TLV's length is known, before the trailing bytes
        assert "after the last TLV" in refusal(data[: 16 + 12 + len(two)])
    past = v2(body=IPV4_BLOCK + tlv(0xE0, b"abc")[:-1], length=12 + 5)
    assert "past the end" in refusal(past[: 16 + 12 + 3])  # on the TLV's own header


def test_crc32c_right_wrong_and_malformed() -> None:
    src, dst = ("192.0.2.1", 1234), ("198.51.100.2", 80)
    good = encode_v2(src, dst, tlvs=[(0xE0, b"x" * 20)], crc32c=True)
    assert parse(good).tlvs[-1][0] == PP2_TYPE_CRC32C
    for at in (17, 26, 33, len(good) - 1):  # an address, a port, a TLV value, the CRC
        bad = bytearray(good)
        bad[at] ^= 0x01
        assert refusal(bytes(bad)) == "PROXY v2: CRC32C mismatch"
    crc_first = v2(body=IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, bytes(4)) + tlv(0xE0, b"y"))
    value = crc32c(crc_first)  # zeroed field: the CRC is of exactly this
    fixed = crc_first.replace(
        tlv(PP2_TYPE_CRC32C, bytes(4)), tlv(PP2_TYPE_CRC32C, value.to_bytes(4, "big"))
    )
    assert parse(fixed).tlvs[0] == (PP2_TYPE_CRC32C, value.to_bytes(4, "big"))
    assert "mismatch" in refusal(crc_first)
    for size in (0, 3, 5):
        data = v2(body=IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, bytes(size)))
        assert "CRC32C TLV is not 4 bytes" in refusal(data)
    twice = v2(body=IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, bytes(4)) * 2)
    assert "more than one CRC32C" in refusal(twice)


def test_a_truncated_v2_header_waits_then_fails_at_eof() -> None:
    data = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    for cut in range(len(data)):
        parser = ProxyParser("v2")
        assert parser.feed(data[:cut]) is None
        with pytest.raises(ProxyProtocolError, match="closed"):
            parser.feed_eof()


@pytest.mark.parametrize("at", range(12))
def test_the_v2_signature_is_checked_byte_by_byte(at: int) -> None:
    wrong = bytearray(V2_SIGNATURE)
    wrong[at] ^= 0x40
    if at == 0:
        assert refusal(bytes(wrong[:1])) == "not a PROXY protocol header"
    else:
        assert refusal(bytes(wrong[: at + 1])) == "not a PROXY protocol v2 signature"


# -- one header, sticky errors, versions -----------------------------------------


def test_a_second_header_is_payload() -> None:
    for first, second in [
        (GOOD4.encode(), GOOD6.encode()),
        (encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)), encode_v2(None, None, command=LOCAL)),
        (GOOD4.encode(), encode_v2(None, None)),
    ]:
        parser = ProxyParser("any")
        header = parser.feed(first + second)
        assert header is not None
        assert header.rest == second
        with pytest.raises(RuntimeError):
            parser.feed(second)
        parser.feed_eof()  # done: the end of input is the payload's business


def test_refusals_are_sticky() -> None:
    parser = ProxyParser("any")
    with pytest.raises(ProxyProtocolError) as first:
        parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n")
    calls: list[Callable[[], object]] = [
        lambda: parser.feed(GOOD4.encode()),
        lambda: parser.feed(b""),
        parser.feed_eof,
    ]
    for call in calls:
        with pytest.raises(ProxyProtocolError) as again:
            call()
        assert again.value.reason == first.value.reason
    assert parser.pending == 0


def test_end_of_input() -> None:
    parser = ProxyParser("any")
    assert parser.feed(b"") is None
    with pytest.raises(ProxyProtocolError, match="before a PROXY header"):
        parser.feed_eof()
    parser = ProxyParser("any")
    assert parser.feed(b"PROXY TCP4 1.2") is None
    with pytest.raises(ProxyProtocolError, match="inside the PROXY header"):
        parser.feed_eof()
    with pytest.raises(ProxyProtocolError, match="inside the PROXY header"):
        parser.feed(b".3.4 5.6.7.8 1 2\r\n")


def test_accept_picks_the_versions() -> None:
    one, two = GOOD4.encode(), encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    assert parse(one, "v1").version == 1
    assert parse(two, "v2").version == 2
    assert parse(one, "any").version == 1
    assert parse(two, "any").version == 2
    assert refusal(two[:1], "v1") == "PROXY v2 header where only v1 is accepted"
    assert refusal(one[:1], "v2") == "PROXY v1 header where only v2 is accepted"
    for accept in ("v1", "v2", "any"):
        assert refusal(b"G", accept) == "not a PROXY protocol header"
        assert refusal(b"\x16\x03\x01", accept).startswith(("not a PROXY", "PROXY v"))
    with pytest.raises(ValueError, match="accept"):
        ProxyParser("v3")  # type: ignore[arg-type]


def test_bytearray_input_and_a_large_payload() -> None:
    payload = bytes(range(256)) * 256
    header = ProxyParser("any").feed(bytearray(encode_v2(None, None) + payload))
    assert header is not None
    assert header.rest == payload
    assert type(header.rest) is bytes


# -- encoders -------------------------------------------------------------------


def test_encode_v1() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("::1", 1), ("2001:db8::2", 2)) == b"PROXY TCP6 ::1 2001:db8::2 1 2\r\n"
    bad: list[tuple[Address | None, Address | None]] = [
        (("1.2.3.4", 1), None),
        (None, ("1.2.3.4", 1)),
        (("1.2.3.4", 1), ("::1", 2)),
        (("fe80::1%eth0", 1), ("::1", 2)),
        (("1.2.3.4", 65536), ("1.2.3.4", 1)),
        (("1.2.3.4", -1), ("1.2.3.4", 1)),
        (("host.example", 1), ("1.2.3.4", 1)),
    ]
    for source, destination in bad:
        with pytest.raises(ValueError):  # noqa: PT011 -- each case has its own message
            encode_v1(source, destination)


def test_encode_v2() -> None:
    assert encode_v2(None, None, command=LOCAL) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert encode_v2(None, None) == V2_SIGNATURE + b"\x21\x00\x00\x00"
    six = encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2))
    assert six[13] == 0x21
    assert len(six) == 16 + 36
    with pytest.raises(ValueError, match="LOCAL"):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), command=LOCAL)
    with pytest.raises(ValueError, match="TLV"):
        encode_v2(None, None, tlvs=[(256, b"")])
    with pytest.raises(ValueError, match="4096"):
        encode_v2(None, None, tlvs=[(0xE0, bytes(MAX_V2_LENGTH - 2))])
    assert len(encode_v2(None, None, tlvs=[(0xE0, bytes(MAX_V2_LENGTH - 3))])) == 16 + 4096
