"""The TLS stage in-process: contexts from files, the handshake deadline, mTLS, reload.

Certificates come from trustme (a CA per test). The handshake deadline is
tested on memory streams under ``MockClock(autojump_threshold=0)``, so the
10 s default is asserted exactly; the rest runs `echosvc.serve` on loopback
with `trio.SSLStream` clients. Real peers (openssl, socat, ncat, HAProxy)
and the CLI are in test_tls_cli.py.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from echosvc import CloseReason, Config, Connection, Server, serve
from echosvc.config import TLSVersion
from echosvc.pipeline import Stage, stages_for
from echosvc.proxyproto import ProxyStage, encode_v2
from echosvc.tls import (
    TLSContexts,
    TLSLoadError,
    TLSStage,
    load_context,
    not_after_of,
    rfc4514_name,
)

from .support import captured_logs, receive_exactly, receive_until_eof
from .tls_support import Certificates, ServerFiles, fingerprint, open_tls, subject_of

TIME_LIMIT = 20
PAYLOAD = b"plain\n\x00nul\r\n\xff\xfe not utf-8\n" + bytes(range(256)) + b"\n"


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


@pytest.fixture
def server_files(certs: Certificates) -> ServerFiles:
    return certs.server()


def tls_config(files: ServerFiles, **changes: Any) -> Config:
    values: dict[str, Any] = {"port": 0, "tls_cert": str(files.cert), "tls_key": str(files.key)}
    values.update(changes)
    return Config(**values)


# --- loading ----------------------------------------------------------------------


def test_a_context_from_cert_and_key_or_from_one_file(server_files: ServerFiles) -> None:
    apart = load_context(str(server_files.cert), str(server_files.key))
    together = load_context(str(server_files.both))
    for loaded in (apart, together):
        assert loaded.context.minimum_version is ssl.TLSVersion.TLSv1_3
        assert loaded.context.verify_mode is ssl.CERT_NONE
    assert apart.not_after == together.not_after
    assert apart.context is not together.context, "every load builds a new context"
    older = load_context(str(server_files.both), min_version=TLSVersion.TLS1_2)
    assert older.context.minimum_version is ssl.TLSVersion.TLSv1_2
    mutual = load_context(
        str(server_files.both), client_ca=str(server_files.cert.parent / "ca.pem")
    )
    assert mutual.context.verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("expiry", "text"),
    [
        # UTCTime before 2050, GeneralizedTime from 2050 (RFC 5280 4.1.2.5).
        (datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.UTC), "2031-05-06T07:08:09Z"),
        (datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=datetime.UTC), "2051-01-02T03:04:05Z"),
    ],
)
def test_not_after_is_the_leafs_expiry_in_utc(
    certs: Certificates, tmp_path: Path, expiry: datetime.datetime, text: str
) -> None:
    leaf = certs.ca.issue_cert("localhost", not_after=expiry)
    both = tmp_path / "both.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
    assert load_context(str(both)).not_after == text
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    assert not_after_of(der) == expiry
    for broken in (der[:40], b"\x30\x82\xff\xff" + der[4:], b"\x02" + der[1:]):
        with pytest.raises(ValueError):  # noqa: PT011 -- any shape error
            not_after_of(broken)


def _encrypted(key_pem: bytes) -> bytes:
    key = load_pem_private_key(key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    ("case", "field", "words"),
    [
        ("missing cert", "tls_cert", "cannot read"),
        ("garbage cert", "tls_cert", "no PEM certificate"),
        ("garbled cert", "tls_cert", "garbled"),
        ("no key in the cert file", "tls_cert", "no private key in it"),
        ("mismatched key in the cert file", "tls_cert", "does not match"),
        ("missing key", "tls_key", "cannot read"),
        ("garbage key", "tls_key", "no PEM private key"),
        ("garbled key", "tls_key", "garbled"),
        ("mismatched key", "tls_key", "does not match the certificate"),
        ("encrypted key", "tls_key", "encrypted"),
        ("missing client CA", "tls_client_ca", "cannot read"),
        ("garbage client CA", "tls_client_ca", "no usable CA certificate"),
    ],
)
def test_load_errors_name_the_file_they_concern(
    certs: Certificates, tmp_path: Path, case: str, field: str, words: str
) -> None:
    good, other = certs.server("good"), certs.server("other")
    cert: str = str(good.cert)
    key: str | None = str(good.key)
    ca: str | None = None
    bad = tmp_path / "bad.pem"
    if case == "missing cert":
        cert = str(tmp_path / "absent.pem")
    elif case == "garbage cert":
        bad.write_text("hello\n")
        cert = str(bad)
    elif case == "garbled cert":
        bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        cert = str(bad)
    elif case == "no key in the cert file":
        key = None
    elif case == "mismatched key in the cert file":
        bad.write_bytes(other.key.read_bytes() + good.cert.read_bytes())
        cert, key = str(bad), None
    elif case == "missing key":
        key = str(tmp_path / "absent.pem")
    elif case == "garbage key":
        bad.write_text("not a key\n")
        key = str(bad)
    elif case == "garbled key":
        bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        key = str(bad)
    elif case == "mismatched key":
        key = str(other.key)
    elif case == "encrypted key":
        bad.write_bytes(_encrypted(good.key.read_bytes()))
        key = str(bad)
    elif case == "missing client CA":
        ca = str(tmp_path / "absent.pem")
    elif case == "garbage client CA":
        bad.write_text("no CA here\n")
        ca = str(bad)
    with pytest.raises(TLSLoadError) as caught:
        load_context(cert, key, ca)
    assert caught.value.field == field
    assert words in caught.value.message


def test_config_wants_a_certificate_before_a_key_or_a_ca() -> None:
    from echosvc import ConfigError

    for field in ("tls_key", "tls_client_ca"):
        with pytest.raises(ConfigError) as caught:
            Config(**{field: "/x.pem"})  # type: ignore[arg-type]
        assert caught.value.field == field
    assert Config(tls_cert="", tls_key="").tls_cert is None, "empty means unset"
    with pytest.raises(ConfigError, match="tls_min_version"):
        Config(tls_min_version="1.1")
    assert Config().tls_min_version is TLSVersion.TLS1_3
    assert Config().tls_handshake_timeout == 10


def test_rfc4514_names() -> None:
    subject = ((("countryName", "US"),), (("organizationName", "Example"),), (("commonName", "c"),))
    assert rfc4514_name(subject) == "CN=c,O=Example,C=US"
    multi = ((("organizationalUnitName", "a"), ("commonName", "b")),)
    assert rfc4514_name(multi) == "OU=a+CN=b"
    tricky = ((("commonName", ' #a,b+c"d\\e<f>g;h=i '),),)
    assert rfc4514_name(tricky) == 'CN=\\ #a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h\\=i\\ '
    assert rfc4514_name(((("2.5.4.97", "x"),),)) == "2.5.4.97=x"


def test_stages_for_puts_tls_after_proxy_and_the_source_limit(server_files: ServerFiles) -> None:
    stages = stages_for(tls_config(server_files, proxy_protocol="v2", max_per_source=3))
    assert [type(stage).__name__ for stage in stages] == [
        "ProxyStage",
        "SourceLimitStage",
        "TLSStage",
    ]
    tls = stages[-1]
    assert isinstance(tls, TLSStage)
    assert (tls.timeout, tls.timeout_reason) == (10, CloseReason.TLS_TIMEOUT)


# --- the handshake on memory streams, on a mock clock --------------------------------------


def client_hello(certs: Certificates) -> bytes:
    """The bytes a client's first flight would put on the wire."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = certs.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def run_connection(
    server: trio.abc.Stream, stages: list[Stage], config: Config | None = None
) -> dict[str, Any]:
    """One connection to its end; its ``connection_closed`` record."""
    with captured_logs() as logs:
        await Connection(server, config or Config(), peer="client", stages=stages).run()
    [record] = logs.events("connection_closed")
    return dict(record)


@asynccontextmanager
async def connection_running(
    server: trio.abc.Stream, stages: list[Stage]
) -> AsyncIterator[dict[str, Any]]:
    """`run_connection` in a task of its own while the block plays the client;
    the dict holds the ``connection_closed`` record once both have ended."""
    result: dict[str, Any] = {}

    async def serve_it() -> None:
        result.update(await run_connection(server, stages))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_it)
        yield result


async def test_a_silent_client_is_closed_at_the_handshake_deadline(
    autojump_clock: trio.testing.MockClock, server_files: ServerFiles
) -> None:
    client, server = trio.testing.memory_stream_pair()
    stage = TLSStage.from_config(tls_config(server_files))
    started = trio.current_time()
    record = await run_connection(server, [stage])
    assert record["reason"] == "tls_timeout"
    assert record["duration_s"] == pytest.approx(10)
    assert trio.current_time() - started == pytest.approx(10)
    assert await receive_until_eof(client) == b"", "nothing sent to a client that said nothing"


async def test_a_trickled_client_hello_is_cut_off_at_the_deadline_not_per_byte(
    autojump_clock: trio.testing.MockClock, certs: Certificates, server_files: ServerFiles
) -> None:
    hello = client_hello(certs)
    assert len(hello) > 20
    client, server = trio.testing.memory_stream_pair()
    stage = TLSStage(TLSContexts.from_config(tls_config(server_files)), 3.0)
    sent = [0]

    async def trickle() -> None:
        for byte in hello:  # bounded: the hello is a few hundred bytes
            try:
                await client.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return
            sent[0] += 1
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        record = await run_connection(server, [stage])
        nursery.cancel_scope.cancel()
    assert record["reason"] == "tls_timeout"
    assert record["duration_s"] == pytest.approx(3)
    assert 5 <= sent[0] < len(hello), "bytes kept coming, yet the deadline held"


async def test_garbage_is_refused_at_once_and_never_answered_in_clear(
    autojump_clock: trio.testing.MockClock, server_files: ServerFiles
) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    record = await run_connection(server, [TLSStage.from_config(tls_config(server_files))])
    assert record["reason"] == "tls_failed"
    assert record["duration_s"] == 0
    assert record["detail"]
    assert record["lines"] == record["bytes_in"] == record["bytes_out"] == 0
    received = await receive_until_eof(client)
    assert b"GET" not in received, "never an echo of a refused connection"


class BioClient:
    """A TLS client on `ssl.SSLObject`: it can send close_notify and go on
    reading, which `trio.SSLStream` (no half-close) cannot."""

    def __init__(self, stream: trio.abc.Stream, context: ssl.SSLContext) -> None:
        self.stream = stream
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            await self.stream.send_all(data)

    async def _more(self) -> None:
        await self._flush()
        data = await self.stream.receive_some()
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        for _ in range(50):  # a handshake is a few round trips
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._more()
            else:
                await self._flush()
                return
        raise AssertionError("no handshake")

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def close_notify(self) -> None:
        with pytest.raises(ssl.SSLWantReadError):  # ours sent; theirs not yet read
            self.tls.unwrap()
        await self._flush()

    async def receive_until_close_notify(self) -> bytes:
        received = bytearray()
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                await self._more()
                continue
            except ssl.SSLZeroReturnError:
                return bytes(received)
            assert chunk, "EOF without close_notify"
            received += chunk


async def test_at_the_clients_close_notify_everything_is_echoed_before_ours(
    autojump_clock: trio.testing.MockClock, certs: Certificates, server_files: ServerFiles
) -> None:
    client_transport, server = trio.testing.memory_stream_pair()
    stage = TLSStage.from_config(tls_config(server_files))
    client = BioClient(client_transport, certs.client_context())
    async with connection_running(server, [stage]) as result:
        await client.handshake()
        await client.send(PAYLOAD + b"last, no newline")
        await client.close_notify()
        echoed = await client.receive_until_close_notify()
    assert echoed == PAYLOAD + b"last, no newline"
    assert result["reason"] == "eof"
    assert result["tls_version"] == "TLSv1.3"
    assert "client_subject" not in result
    # Plaintext, both ways.
    assert result["bytes_in"] == result["bytes_out"] == len(PAYLOAD) + 16
    assert result["lines"] == PAYLOAD.count(b"\n") + 1


async def test_a_client_that_vanishes_without_close_notify_is_a_reset(
    autojump_clock: trio.testing.MockClock, certs: Certificates, server_files: ServerFiles
) -> None:
    client_transport, server = trio.testing.memory_stream_pair()
    stage = TLSStage.from_config(tls_config(server_files))
    client = BioClient(client_transport, certs.client_context())
    async with connection_running(server, [stage]) as result:
        await client.handshake()
        await client.send(b"one\n")
        await client_transport.send_eof()  # a FIN, no close_notify: truncation
    assert result["reason"] == "reset", "https_compatible=False tells the two apart"


class _PrefixedFirstSend(trio.abc.Stream):
    """Sends ``prefix`` in the same segment as the first thing sent over it."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream, self.prefix = stream, prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data, self.prefix = self.prefix + bytes(data), b""
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_a_client_hello_in_the_proxy_headers_segment_is_not_lost(
    autojump_clock: trio.testing.MockClock, certs: Certificates, server_files: ServerFiles
) -> None:
    header = encode_v2(("203.0.113.9", 999), ("192.0.2.1", 443))
    client_transport, server = trio.testing.memory_stream_pair()
    stages: list[Stage] = [
        ProxyStage("v2", [], 5.0),
        TLSStage.from_config(tls_config(server_files)),
    ]
    client = trio.SSLStream(
        _PrefixedFirstSend(client_transport, header),
        certs.client_context(),
        server_hostname="localhost",
    )
    result: dict[str, Any] = {}

    async def serve_it() -> None:
        with captured_logs() as logs:
            await Connection(
                server, Config(), peer="127.0.0.1:5", address=None, stages=stages
            ).run()
        result.update(logs.events("connection_closed")[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_it)
        await client.send_all(b"behind a balancer\n")
        assert await receive_exactly(client, 18) == b"behind a balancer\n"
        await client.aclose()
    assert (result["reason"], result["peer"]) == ("eof", "203.0.113.9:999")
    assert result["proxy"] == "127.0.0.1:5"
    assert result["bytes_in"] == 18, "the header's bytes are not echo payload"


# --- on loopback, through echosvc.serve ----------------------------------------------------


async def start_server(nursery: trio.Nursery, config: Config) -> Server:
    server: Server = await nursery.start(serve, config)
    return server


async def test_tls_13_by_default_and_12_only_when_asked(
    certs: Certificates, server_files: ServerFiles
) -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            strict = await start_server(nursery, tls_config(server_files))
            lenient = await start_server(nursery, tls_config(server_files, tls_min_version="1.2"))
            old = certs.client_context(maximum=ssl.TLSVersion.TLSv1_2)
            with pytest.raises(trio.BrokenResourceError) as refused:
                await open_tls(strict.port, old)
            # The server's alert reaches the client (not a bare EOF).
            assert "PROTOCOL_VERSION" in str(refused.value.__cause__).upper()
            stream = await open_tls(lenient.port, old)
            assert stream.version() == "TLSv1.2"
            await stream.send_all(b"twelve\n")
            assert await receive_exactly(stream, 7) == b"twelve\n"
            await stream.aclose()
            await logs.wait_for("connection_closed", 2)
            strict.shutdown()
            lenient.shutdown()
    closed = sorted(logs.events("connection_closed"), key=lambda r: r["reason"])
    assert [c["reason"] for c in closed] == ["eof", "tls_failed"]
    assert closed[0]["tls_version"] == "TLSv1.2"
    assert closed[1]["detail"] == "unsupported protocol"


async def test_plain_text_to_a_tls_port_is_refused_and_the_server_unharmed(
    certs: Certificates, server_files: ServerFiles
) -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, tls_config(server_files))
            plain = await trio.open_tcp_stream("127.0.0.1", server.port)
            await plain.send_all(b"hello in clear\n")
            try:
                received = await receive_until_eof(plain)
            except trio.BrokenResourceError:
                received = b""
            assert b"hello" not in received
            await plain.aclose()
            stream = await open_tls(server.port, certs.client_context())
            await stream.send_all(b"still here\n")
            assert await receive_exactly(stream, 11) == b"still here\n"
            await stream.aclose()
            await logs.wait_for("connection_closed", 2)
            server.shutdown()
    assert [c["reason"] for c in logs.events("connection_closed")] == ["tls_failed", "eof"]
    assert server.statistics().closed["tls_failed"] == 1


async def test_mutual_tls_with_and_without_a_client_certificate(
    certs: Certificates, server_files: ServerFiles, tmp_path: Path
) -> None:
    (tmp_path / "elsewhere").mkdir()
    identity = certs.client_identity("client")
    config = tls_config(server_files, tls_client_ca=str(certs.ca_file))
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, config)
            known = await open_tls(server.port, certs.client_context(identity=identity))
            await known.send_all(b"it is me\n")
            assert await receive_exactly(known, 9) == b"it is me\n"
            await known.aclose()
            await logs.wait_for("connection_closed")
            # TLS 1.3: the client's handshake "succeeds" (its Finished is
            # sent before the server has looked at its certificate); the
            # refusal arrives as an alert on its first read (openssl#8500).
            anonymous = await open_tls(server.port, certs.client_context())
            await anonymous.send_all(b"who am I\n")
            with pytest.raises(trio.BrokenResourceError) as refused:
                await anonymous.receive_some()
            assert "CERTIFICATE_REQUIRED" in str(refused.value.__cause__).upper()
            await trio.aclose_forcefully(anonymous)
            await logs.wait_for("connection_closed", 2)
            # A certificate from a CA the server does not trust.
            stranger = Certificates(tmp_path / "elsewhere").client_identity("stranger")
            foreign = await open_tls(server.port, certs.client_context(identity=stranger))
            await foreign.send_all(b"let me in\n")
            with pytest.raises(trio.BrokenResourceError) as unknown:
                await foreign.receive_some()
            assert "UNKNOWN_CA" in str(unknown.value.__cause__).upper()
            await trio.aclose_forcefully(foreign)
            await logs.wait_for("connection_closed", 3)
            server.shutdown()
    first, second, third = logs.events("connection_closed")
    assert third["reason"] == "tls_failed"
    assert third["detail"].startswith("certificate verify failed")
    assert second["detail"] == "peer did not return a certificate"
    assert (first["reason"], first["client_subject"]) == ("eof", subject_of(identity))
    assert first["client_subject"] == "CN=client,OU=Echo,O=Example"
    assert (second["reason"], second["bytes_in"]) == ("tls_failed", 0)
    assert "client_subject" not in second


async def test_a_shutdown_closes_connections_still_in_their_handshake_at_once(
    server_files: ServerFiles,
) -> None:
    config = tls_config(server_files, shutdown_grace=30, tls_handshake_timeout=30)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, config)
            silent = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(3)]
            await silent[0].send_all(client_hello_prefix())  # one has begun its hello
            await logs.wait_for("connection_opened", 3)
            began = trio.current_time()
            server.shutdown()
            with trio.fail_after(2):  # not the 30 s grace, nor the 30 s deadline
                await logs.wait_for("connection_closed", 3)
            took = trio.current_time() - began
            for stream in silent:
                await stream.aclose()
    assert [c["reason"] for c in logs.events("connection_closed")] == ["shutdown"] * 3
    assert took < 1


def client_hello_prefix() -> bytes:
    """The first bytes of a TLS handshake record: a hello under way."""
    return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


async def test_reload_swaps_the_context_for_new_connections_only(
    certs: Certificates, tmp_path: Path
) -> None:
    first, second = certs.server("first"), certs.server("second")
    live = ServerFiles(tmp_path / "live.cert.pem", tmp_path / "live.key.pem", first.both, "")
    live.cert.write_bytes(first.cert.read_bytes())
    live.key.write_bytes(first.key.read_bytes())
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, tls_config(live))
            [stage] = server.stages
            assert isinstance(stage, TLSStage)
            old = await open_tls(server.port, certs.client_context())
            assert fingerprint(old) == first.fingerprint
            # Rotate: the same paths, new contents.
            live.cert.write_bytes(second.cert.read_bytes())
            live.key.write_bytes(second.key.read_bytes())
            await stage.reload()
            new = await open_tls(server.port, certs.client_context())
            assert fingerprint(new) == second.fingerprint
            for stream in (old, new):
                await stream.send_all(b"both echo\n")
                assert await receive_exactly(stream, 10) == b"both echo\n"
            # A broken file: the second certificate stays.
            live.key.write_text("garbage\n")
            await stage.reload()
            kept = await open_tls(server.port, certs.client_context())
            assert fingerprint(kept) == second.fingerprint
            for stream in (old, new, kept):
                await stream.aclose()
            await logs.wait_for("connection_closed", 3)
            server.shutdown()
    [reloaded] = logs.events("tls_reloaded")
    assert reloaded["not_after"].endswith("Z")
    [failed] = logs.events("tls_reload_failed")
    assert failed["log_level"] == "error"
    assert "tls_key" in failed["error"]
    assert "no PEM private key" in failed["error"]
    assert [c["reason"] for c in logs.events("connection_closed")] == ["eof"] * 3
