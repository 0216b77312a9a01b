"""The service's configuration: one frozen, validated object.

Every knob of DESIGN.md lives here with its default, and every value is
checked when the object is built, so a bad value is rejected before anything
binds. A rejected value raises `ConfigError`, which names the field; the CLI
turns the field name into the flag the user typed.

This module imports nothing from the rest of the package: it is the one
vocabulary every other module shares.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, TypeVar

import attrs

DEFAULT_PORT = 9000

_E = TypeVar("_E", bound="StrEnum")


class Mode(StrEnum):
    """How a connection echoes: `line` frames on ``\\n``; `stream` is RFC 862."""

    LINE = "line"
    STREAM = "stream"


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class ProxyProtocol(StrEnum):
    """Which PROXY protocol header every connection must start with (`off`: none)."""

    OFF = "off"
    V1 = "v1"
    V2 = "v2"
    ANY = "any"


class TLSVersion(StrEnum):
    """The oldest TLS version a handshake may settle on (``--tls-min-version``)."""

    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# DESIGN.md: only load balancers on this host may vouch for a client by default.
DEFAULT_PROXY_TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)


class CloseReason(StrEnum):
    """Why a connection ended: the ``reason`` field of ``connection_closed``.

    The last six belong to the pipeline's stages (`echosvc.pipeline`): a
    connection they close is never echoed to.
    """

    EOF = "eof"
    READ_TIMEOUT = "read_timeout"
    WRITE_TIMEOUT = "write_timeout"
    LINE_TOO_LONG = "line_too_long"
    RESET = "reset"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    PROXY_INVALID = "proxy_invalid"
    PROXY_UNTRUSTED = "proxy_untrusted"
    PROXY_TIMEOUT = "proxy_timeout"
    SOURCE_LIMIT = "source_limit"
    TLS_TIMEOUT = "tls_timeout"
    TLS_FAILED = "tls_failed"


class ConfigError(ValueError):
    """A configuration value is invalid. ``field`` names the `Config` field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _seconds(inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(attribute.name, f"must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(attribute.name, f"must be a number of seconds >= 0, not {value!r}")


def _worker_timeout(inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    _seconds(inst, attribute, value)
    # Workers send a heartbeat every 0.5 s (`echosvc.workers`): a shorter
    # timeout would kill healthy workers between two of them.
    if 0 < value < 1:
        raise ConfigError(attribute.name, f"must be 0 (off) or at least 1 second, not {value!r}")


def _whole(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(attribute.name, f"must be a whole number, not {value!r}")


def _at_least_one(inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    _whole(inst, attribute, value)
    if value < 1:
        raise ConfigError(attribute.name, f"must be at least 1, not {value!r}")


def _flag(inst: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(attribute.name, f"must be true or false, not {value!r}")


# The largest payload a UDP header can describe (its length field is 16 bits,
# and counts the 8-byte header): a larger limit could never be reached.
MAX_UDP_PAYLOAD = 65535 - 8


def _udp_bytes(inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    _at_least_one(inst, attribute, value)
    if value > MAX_UDP_PAYLOAD:
        raise ConfigError(
            attribute.name, f"must be at most {MAX_UDP_PAYLOAD} (a UDP datagram), not {value!r}"
        )


def _port(inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    _whole(inst, attribute, value)
    if not 0 <= value <= 65535:
        raise ConfigError(attribute.name, f"must be between 0 and 65535, not {value!r}")


def _hosts(
    inst: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    if not value:
        raise ConfigError(attribute.name, "needs at least one host")
    for host in value:
        if not host or host != host.strip():
            raise ConfigError(attribute.name, f"{host!r} is not a host name or address")


def _host_tuple(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _metrics_address(value: object) -> str | None:
    """``--metrics``: ``HOST:PORT`` (``[v6]:PORT``), or ``off``/empty for none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError("metrics", f"must be HOST:PORT or off, not {value!r}")
    if value.strip().lower() in ("", "off"):
        return None
    host, port = split_host_port(value)  # raises ConfigError naming the field
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port)``.

    Raises:
      ConfigError: (field ``metrics``) not of that form, or the port is out
          of range. An empty host is refused rather than read as "every
          address": exposing metrics is a decision to spell out (``0.0.0.0``).

    """
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: the port is ambiguous
    if not sep or not host or host != host.strip() or not (port.isascii() and port.isdigit()):
        raise ConfigError(
            "metrics", f"must be HOST:PORT (IPv6 as [::1]:9180) or off, not {value!r}"
        )
    if not 0 <= int(port) <= 65535:
        raise ConfigError("metrics", f"port must be between 0 and 65535, not {value!r}")
    return host, int(port)


def _choice(kind: type[_E], field: str, value: object) -> _E:
    try:
        return kind(value)  # type: ignore[arg-type]  # anything else is rejected below
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ConfigError(field, f"must be one of {choices}, not {value!r}") from None


def _mode(value: object) -> Mode:
    return _choice(Mode, "mode", value)


def _proxy_protocol(value: object) -> ProxyProtocol:
    return _choice(ProxyProtocol, "proxy_protocol", value)


def _networks(value: str | IPNetwork | Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """CIDR text (or networks) -> networks; a bad one raises, naming the field.

    Strict about what an operator most likely mistyped: host bits set
    (``10.0.0.1/8``: meant ``/32``, or ``10.0.0.0/8``?) and IPv6 zones,
    which a peer address from ``accept()`` never carries.
    """
    # A network is iterable too (of its addresses): one value is wrapped first.
    items = (
        (value,)
        if isinstance(value, str | ipaddress.IPv4Network | ipaddress.IPv6Network)
        else value
    )
    networks: list[IPNetwork] = []
    for item in items:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(item)
            continue
        text = item.strip()
        if "%" in text:
            raise ConfigError("proxy_trusted", f"{item!r}: a zone id cannot match a peer address")
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError:
            message = f"{item!r} is not a CIDR network such as 10.0.0.0/8 or 2001:db8::/32"
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                pass
            else:
                host = f"{ipaddress.ip_interface(text).ip}/{loose.max_prefixlen}"
                message = f"{item!r} has host bits set: the network is {loose}, one host {host}"
            raise ConfigError("proxy_trusted", message) from None
    return tuple(networks)


def _some_networks(
    inst: object, attribute: attrs.Attribute[tuple[IPNetwork, ...]], value: tuple[IPNetwork, ...]
) -> None:
    if not value:
        # Trusting nobody would refuse every connection: surely a mistake.
        raise ConfigError(attribute.name, "needs at least one CIDR network")


def _at_least_zero(inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    _whole(inst, attribute, value)
    if value < 0:
        raise ConfigError(attribute.name, f"must be 0 (no limit) or more, not {value!r}")


def _tls_version(value: object) -> TLSVersion:
    return _choice(TLSVersion, "tls_min_version", value)


def _path_or_none(value: object) -> str | None:
    """A file name, or None for unset (an empty variable is unset too)."""
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def _tls_files(inst: Config, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and inst.tls_cert is None:
        raise ConfigError(attribute.name, "needs a certificate (--tls-cert) to go with it")


def _log_format(value: object) -> LogFormat:
    return _choice(LogFormat, "log_format", value)


def _log_level(value: object) -> LogLevel:
    return _choice(LogLevel, "log_level", value)


@attrs.frozen(kw_only=True)
class Config:
    """Everything that decides how echosvc behaves.

    The defaults are DESIGN.md's. A timeout of ``0`` disables that deadline.
    ``workers``, ``worker_timeout``, ``log_format``, ``log_level`` and
    ``metrics`` are read only by the daemon (`echosvc.daemon`,
    `echosvc.supervisor`): the library serves in
    the process and task it is given, and never configures logging.

    Raises:
      ConfigError: if any value is out of range; its ``field`` names the
          offending field.

    """

    hosts: tuple[str, ...] = attrs.field(
        default=("127.0.0.1",), converter=_host_tuple, validator=_hosts
    )
    port: int = attrs.field(default=DEFAULT_PORT, validator=_port)
    mode: Mode = attrs.field(default=Mode.LINE, converter=_mode)
    read_timeout: float = attrs.field(default=300.0, validator=_seconds)
    write_timeout: float = attrs.field(default=30.0, validator=_seconds)
    max_line_bytes: int = attrs.field(default=65536, validator=_at_least_one)
    max_connections: int = attrs.field(default=10000, validator=_at_least_one)
    shutdown_grace: float = attrs.field(default=10.0, validator=_seconds)
    # The PROXY protocol stage (echosvc.proxyproto) and the per-source limit
    # (echosvc.limits): off unless asked for.
    proxy_protocol: ProxyProtocol = attrs.field(
        default=ProxyProtocol.OFF, converter=_proxy_protocol
    )
    proxy_trusted: tuple[IPNetwork, ...] = attrs.field(
        default=DEFAULT_PROXY_TRUSTED, converter=_networks, validator=_some_networks
    )
    proxy_timeout: float = attrs.field(default=5.0, validator=_seconds)
    max_per_source: int = attrs.field(default=0, validator=_at_least_zero)
    # The TLS stage (echosvc.tls): file names, read by the stage (and again
    # on each reload); no certificate, no TLS.
    tls_cert: str | None = attrs.field(default=None, converter=_path_or_none)
    tls_key: str | None = attrs.field(default=None, converter=_path_or_none, validator=_tls_files)
    tls_client_ca: str | None = attrs.field(
        default=None, converter=_path_or_none, validator=_tls_files
    )
    tls_min_version: TLSVersion = attrs.field(default=TLSVersion.TLS1_3, converter=_tls_version)
    tls_handshake_timeout: float = attrs.field(default=10.0, validator=_seconds)
    backlog: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_at_least_one)
    )
    workers: int = attrs.field(default=1, validator=_at_least_one)
    worker_timeout: float = attrs.field(default=30.0, validator=_worker_timeout)
    log_format: LogFormat = attrs.field(default=LogFormat.AUTO, converter=_log_format)
    log_level: LogLevel = attrs.field(default=LogLevel.INFO, converter=_log_level)
    # UDP echo (RFC 862's datagram half): off unless asked for; see echosvc.udp.
    udp: bool = attrs.field(default=False, validator=_flag)
    udp_max_bytes: int = attrs.field(default=1472, validator=_udp_bytes)
    udp_rate: int = attrs.field(default=100, validator=_at_least_one)
    # The Prometheus endpoint, "host:port"; None: off. Read by the daemon only.
    metrics: str | None = attrs.field(default=None, converter=_metrics_address)

    def evolve(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied and validated."""
        return attrs.evolve(self, **changes)


def environment_for(config: Config) -> dict[str, str]:
    """``config`` as ``ECHOSVC_*`` variables: ``ECHOSVC_`` + the field name.

    (``hosts`` is ``ECHOSVC_HOST``, comma separated; an unset backlog is
    left out.) The CLI names its variables by the same rule.
    """
    environ = {}
    for field in attrs.fields(Config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if field.name == "hosts":
            environ["ECHOSVC_HOST"] = ",".join(value)
        elif field.name == "proxy_trusted":
            environ["ECHOSVC_PROXY_TRUSTED"] = ",".join(str(network) for network in value)
        else:
            environ[f"ECHOSVC_{field.name.upper()}"] = str(value)
    return environ


def config_to_json(config: Config) -> str:
    """``config`` as one JSON object, field by field, for `config_from_json`.

    How a supervisor hands its workers their configuration: every field,
    exactly (floats as JSON floats, enums as their values, networks and
    paths as their text), with no command line to parse in between.
    """

    def plain(value: object) -> object:
        if isinstance(value, StrEnum):
            return value.value
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        if value is None or isinstance(value, str | bool | int | float):
            return value
        return str(value)  # a network, a path: every such field converts from text

    return json.dumps(
        {field.name: plain(getattr(config, field.name)) for field in attrs.fields(Config)}
    )


def config_from_json(text: str) -> Config:
    """The `Config` that `config_to_json` wrote.

    Raises:
      ConfigError: a value is invalid (as for any `Config`).
      TypeError: ``text`` is not such an object.

    """
    values = json.loads(text)
    if not isinstance(values, dict):
        raise TypeError("a configuration is a JSON object")
    fields: dict[str, Any] = {
        name: tuple(value) if isinstance(value, list) else value for name, value in values.items()
    }
    return Config(**fields)


def seconds_or_never(timeout: float) -> float:
    """A timeout as a relative deadline: ``0`` means "never" (`math.inf`)."""
    return timeout if timeout > 0 else math.inf
