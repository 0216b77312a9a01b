"""Certificates for the TLS tests (trustme), and the TLS client helpers they share."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import attrs
import trio
import trustme
from cryptography import x509


@attrs.frozen
class ServerFiles:
    """One server certificate as the files ``serve`` is given."""

    cert: Path  # the chain, leaf first
    key: Path
    both: Path  # key and chain in one file
    fingerprint: str  # SHA-256 of the leaf, hex

    def args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]


class Certificates:
    """A test CA, the server certificates it issues, and a client identity."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA(organization_name="Example")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._issued = 0

    def server(self, name: str = "server") -> ServerFiles:
        """A new leaf for localhost and 127.0.0.1, written under ``name``."""
        self._issued += 1
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", "::1", common_name=name)
        cert, key, both = (
            self.directory / f"{name}.{kind}.pem" for kind in ("cert", "key", "both")
        )
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
        der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        return ServerFiles(cert, key, both, hashlib.sha256(der).hexdigest())

    def client_context(
        self,
        *,
        identity: trustme.LeafCert | None = None,
        maximum: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if identity is not None:
            identity.configure_cert(context)
        if maximum is not None:
            context.maximum_version = maximum
        return context

    def client_identity(self, name: str = "client") -> trustme.LeafCert:
        return self.ca.issue_cert(
            f"{name}@example.com",
            common_name=name,
            organization_name="Example",
            organization_unit_name="Echo",
        )


def subject_of(leaf: trustme.LeafCert) -> str:
    """The leaf's subject in RFC 4514 form, as cryptography writes it."""
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return cert.subject.rfc4514_string()


def fingerprint(stream: trio.SSLStream[trio.SocketStream]) -> str:
    der = stream.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


async def open_tls(
    port: int,
    context: ssl.SSLContext,
    *,
    host: str = "127.0.0.1",
    prefix: bytes = b"",
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to ``port``, handshake done (``prefix`` sent in clear first)."""
    tcp = await trio.open_tcp_stream(host, port)
    try:
        if prefix:
            await tcp.send_all(prefix)
        stream = trio.SSLStream(tcp, context, server_hostname=host)
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream
