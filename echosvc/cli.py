"""The ``echosvc`` command line (typer): ``serve``, ``check``, ``bench``, ``--version``.

Every ``serve`` option has an ``ECHOSVC_*`` environment variable, for
systemd's ``EnvironmentFile=`` and for containers; a flag beats its variable.
Values are checked by `echosvc.Config` before anything binds, and a bad one
is a usage error (exit status 2) that names the flag.
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Annotated, Any

import rich.console
import rich.live
import rich.table
import trio
import typer

from . import daemon, supervisor
from ._version import __version__
from .bench import BenchResult, run_bench, run_child
from .client import (
    HeaderVersion,
    LoadShape,
    ProbeError,
    ProxyClaim,
    TLSClient,
    parse_endpoint,
    probe,
    probe_udp,
)
from .config import Config, ConfigError, LogFormat, LogLevel, Mode, ProxyProtocol, TLSVersion

__all__ = ["app", "main"]

_DEFAULTS = Config()

app = typer.Typer(
    name="echosvc",
    help="A TCP echo service on Trio's structured concurrency.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain usage errors: they end up in journals and container logs.
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"echosvc {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """A TCP echo service on Trio's structured concurrency."""


def _split_hosts(values: list[str] | None) -> tuple[str, ...]:
    """``--host a --host b`` and ``ECHOSVC_HOST=a,b`` give the same hosts."""
    hosts = [part.strip() for value in values or [] for part in value.split(",")]
    return tuple(host for host in hosts if host)


def _split_commas(values: list[str] | None) -> tuple[str, ...]:
    """``--proxy-trusted a --proxy-trusted b`` and ``ECHOSVC_PROXY_TRUSTED=a,b`` alike."""
    return tuple(
        part.strip() for value in values or [] for part in value.split(",") if part.strip()
    )


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        list[str] | None,
        typer.Option(
            envvar="ECHOSVC_HOST",
            metavar="HOST",
            help="Address to listen on; repeat for several (env: comma separated).",
            show_default="127.0.0.1",
        ),
    ] = None,
    port: Annotated[
        int, typer.Option(envvar="ECHOSVC_PORT", help="TCP port; 0 picks a free one.")
    ] = _DEFAULTS.port,
    mode: Annotated[
        Mode, typer.Option(envvar="ECHOSVC_MODE", help="line: echo lines; stream: RFC 862.")
    ] = _DEFAULTS.mode,
    read_timeout: Annotated[
        float,
        typer.Option(
            envvar="ECHOSVC_READ_TIMEOUT", help="Seconds for each line to arrive; 0: off."
        ),
    ] = _DEFAULTS.read_timeout,
    write_timeout: Annotated[
        float,
        typer.Option(envvar="ECHOSVC_WRITE_TIMEOUT", help="Seconds for each echo to send; 0: off."),
    ] = _DEFAULTS.write_timeout,
    max_line_bytes: Annotated[
        int,
        typer.Option(envvar="ECHOSVC_MAX_LINE_BYTES", help="Longest line, counting its newline."),
    ] = _DEFAULTS.max_line_bytes,
    max_connections: Annotated[
        int,
        typer.Option(envvar="ECHOSVC_MAX_CONNECTIONS", help="Connections served at once."),
    ] = _DEFAULTS.max_connections,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            envvar="ECHOSVC_SHUTDOWN_GRACE", help="Seconds to let connections finish on shutdown."
        ),
    ] = _DEFAULTS.shutdown_grace,
    proxy_protocol: Annotated[
        ProxyProtocol,
        typer.Option(
            envvar="ECHOSVC_PROXY_PROTOCOL",
            help="Every connection starts with a PROXY header of this version (any: either).",
        ),
    ] = _DEFAULTS.proxy_protocol,
    proxy_trusted: Annotated[
        list[str] | None,
        typer.Option(
            envvar="ECHOSVC_PROXY_TRUSTED",
            metavar="CIDR",
            help="Peers that may send a PROXY header; repeat for several (env: comma separated).",
            show_default=",".join(str(network) for network in _DEFAULTS.proxy_trusted),
        ),
    ] = None,
    proxy_timeout: Annotated[
        float,
        typer.Option(
            envvar="ECHOSVC_PROXY_TIMEOUT", help="Seconds for the whole PROXY header; 0: off."
        ),
    ] = _DEFAULTS.proxy_timeout,
    max_per_source: Annotated[
        int,
        typer.Option(
            envvar="ECHOSVC_MAX_PER_SOURCE",
            help="Connections at once per client (IPv4 address, IPv6 /64); 0: no limit.",
        ),
    ] = _DEFAULTS.max_per_source,
    backlog: Annotated[
        int | None,
        typer.Option(
            envvar="ECHOSVC_BACKLOG", help="Listen backlog.", show_default="the system maximum"
        ),
    ] = None,
    workers: Annotated[
        str,
        typer.Option(
            envvar="ECHOSVC_WORKERS",
            metavar="N|auto",
            help="Processes sharing the port; auto: one per CPU available.",
        ),
    ] = str(_DEFAULTS.workers),
    worker_timeout: Annotated[
        float,
        typer.Option(
            envvar="ECHOSVC_WORKER_TIMEOUT",
            help="Seconds a worker may go without a heartbeat before it is killed; 0: off.",
        ),
    ] = _DEFAULTS.worker_timeout,
    log_format: Annotated[
        LogFormat,
        typer.Option(envvar="ECHOSVC_LOG_FORMAT", help="auto: console on a TTY, else JSON."),
    ] = _DEFAULTS.log_format,
    log_level: Annotated[
        LogLevel, typer.Option(envvar="ECHOSVC_LOG_LEVEL", help="Lowest level logged.")
    ] = _DEFAULTS.log_level,
    udp: Annotated[
        bool,
        typer.Option(
            "--udp",
            envvar="ECHOSVC_UDP",
            help="Also serve echo over UDP on the same hosts and port.",
            show_default="off",
        ),
    ] = _DEFAULTS.udp,
    udp_max_bytes: Annotated[
        int,
        typer.Option(
            envvar="ECHOSVC_UDP_MAX_BYTES", help="Longest datagram echoed; longer ones are dropped."
        ),
    ] = _DEFAULTS.udp_max_bytes,
    udp_rate: Annotated[
        int,
        typer.Option(
            envvar="ECHOSVC_UDP_RATE", help="Datagrams per second per source (and the burst)."
        ),
    ] = _DEFAULTS.udp_rate,
    tls_cert: Annotated[
        str | None,
        typer.Option(
            envvar="ECHOSVC_TLS_CERT",
            metavar="FILE",
            help="Serve TLS with this PEM certificate chain (it may hold the key too).",
            show_default="none: plain TCP",
        ),
    ] = None,
    tls_key: Annotated[
        str | None,
        typer.Option(
            envvar="ECHOSVC_TLS_KEY",
            metavar="FILE",
            help="The certificate's PEM private key, unencrypted.",
            show_default="in the --tls-cert file",
        ),
    ] = None,
    tls_client_ca: Annotated[
        str | None,
        typer.Option(
            envvar="ECHOSVC_TLS_CLIENT_CA",
            metavar="FILE",
            help="Require client certificates signed by these CAs (mutual TLS).",
            show_default="none",
        ),
    ] = None,
    tls_min_version: Annotated[
        TLSVersion,
        typer.Option(envvar="ECHOSVC_TLS_MIN_VERSION", help="Oldest TLS version accepted."),
    ] = _DEFAULTS.tls_min_version,
    tls_handshake_timeout: Annotated[
        float,
        typer.Option(
            envvar="ECHOSVC_TLS_HANDSHAKE_TIMEOUT",
            help="Seconds for the whole TLS handshake; 0: off.",
        ),
    ] = _DEFAULTS.tls_handshake_timeout,
    metrics: Annotated[
        str,
        typer.Option(
            envvar="ECHOSVC_METRICS",
            metavar="HOST:PORT",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics; off: none.",
        ),
    ] = "off",
) -> None:
    """Run the echo service until SIGTERM or SIGINT (a second one stops at once)."""
    try:
        config = Config(
            hosts=_split_hosts(host) or _DEFAULTS.hosts,
            port=port,
            mode=mode,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            max_line_bytes=max_line_bytes,
            max_connections=max_connections,
            shutdown_grace=shutdown_grace,
            proxy_protocol=proxy_protocol,
            proxy_trusted=_split_commas(proxy_trusted) or _DEFAULTS.proxy_trusted,
            proxy_timeout=proxy_timeout,
            max_per_source=max_per_source,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            tls_min_version=tls_min_version,
            tls_handshake_timeout=tls_handshake_timeout,
            backlog=backlog,
            workers=_parse_workers(workers),
            worker_timeout=worker_timeout,
            log_format=log_format,
            log_level=log_level,
            udp=udp,
            udp_max_bytes=udp_max_bytes,
            udp_rate=udp_rate,
            metrics=metrics,
        )
        if config.tls_cert is not None:
            # Before anything binds: a file that cannot be used is a usage error.
            from .tls import TLSStage

            TLSStage.from_config(config)
    except ConfigError as exc:
        raise typer.BadParameter(exc.message, param_hint=_param_hint(ctx, exc.field)) from None
    except ValueError as exc:  # echosvc.tls.TLSLoadError
        field, message = getattr(exc, "field", "tls_cert"), getattr(exc, "message", str(exc))
        raise typer.BadParameter(message, param_hint=_param_hint(ctx, field)) from None
    address_given = any(
        getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
        for name in ("host", "port")
    )
    run = supervisor.run if config.workers > 1 else daemon.run
    try:
        status = run(config, address_given=address_given)
    except KeyboardInterrupt:
        # Ctrl-C before the daemon owned its signals (logs, rlimit, binding):
        # nothing was serving, so exit as __main__ does, quietly.
        status = 130
    raise typer.Exit(status)


def _parse_workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    try:
        return int(value)
    except ValueError:
        raise ConfigError("workers", f"must be a whole number or auto, not {value!r}") from None


def _param_hint(ctx: typer.Context, field: str) -> str:
    """The flag and variable a Config field is set by, as click names them."""
    name = "host" if field == "hosts" else field
    for param in ctx.command.params:
        if param.name == name:
            envvar = param.envvar if isinstance(param.envvar, str) else None
            return f"'{param.opts[0]}' / {envvar}" if envvar else f"'{param.opts[0]}'"
    return field


# check and bench speak to a --proxy-protocol listener as a load balancer
# would. The variable is the server's own, so that a probe sharing the
# service's environment (a container's HEALTHCHECK) sends what it expects;
# "any" sends v2, which such a listener takes.
_PROXY_PROTOCOL_OPTION = typer.Option(
    "--proxy-protocol",
    envvar="ECHOSVC_PROXY_PROTOCOL",
    help="Send a PROXY header of this version first (any: v2; off: none).",
)
_PROXY_SOURCE_OPTION = typer.Option(
    "--proxy-source",
    metavar="IP:PORT",
    help="The client the PROXY header names ([IPv6]:PORT for IPv6).",
    show_default="this connection's own address",
)


_TLS_OPTION = typer.Option(
    "--tls", help="Speak TLS (after the PROXY header, if any), as to a --tls-cert listener."
)
_TLS_CA_OPTION = typer.Option(
    "--tls-ca",
    metavar="FILE",
    help="Verify the server against the CA certificates in this PEM file.",
    show_default="the system's trust store",
)
_TLS_INSECURE_OPTION = typer.Option(
    "--tls-insecure", help="Do not verify the server's certificate (self-signed test set-ups)."
)


def _tls_client(tls: bool, ca: str | None, insecure: bool) -> TLSClient | None:
    if not tls:
        for flag, given in (("'--tls-ca'", ca is not None), ("'--tls-insecure'", insecure)):
            if given:
                raise typer.BadParameter("needs --tls", param_hint=flag)
        return None
    if ca is not None and insecure:
        raise typer.BadParameter(
            "verify against a CA, or not at all: not both",
            param_hint="'--tls-ca' / '--tls-insecure'",
        )
    client = TLSClient(ca=ca, insecure=insecure)
    try:
        client.context()
    except OSError as exc:  # ssl.SSLError is one too
        reason = getattr(exc, "strerror", None) or str(exc)
        raise typer.BadParameter(f"{ca}: {reason}", param_hint="'--tls-ca'") from None
    return client


def _proxy_claim(version: ProxyProtocol, source: str | None) -> ProxyClaim | None:
    if version is ProxyProtocol.OFF:
        if source is not None:
            raise typer.BadParameter(
                "needs --proxy-protocol v1 or v2", param_hint="'--proxy-source'"
            )
        return None
    try:
        address = None if source is None else parse_endpoint(source)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--proxy-source'") from None
    header = HeaderVersion.V1 if version is ProxyProtocol.V1 else HeaderVersion.V2
    return ProxyClaim(header, address)


@app.command()
def check(
    host: Annotated[
        str,
        typer.Option(
            envvar="ECHOSVC_HOST",
            help="Host to probe (the first, if the variable lists several).",
        ),
    ] = _DEFAULTS.hosts[0],
    # Range-checked here: the C library would quietly wrap 70000 to 4464.
    port: Annotated[
        int, typer.Option(envvar="ECHOSVC_PORT", min=1, max=65535, help="Port to probe.")
    ] = _DEFAULTS.port,
    timeout: Annotated[float, typer.Option(help="Seconds for the whole probe.", min=0.001)] = 2.0,
    udp: Annotated[
        bool, typer.Option("--udp", help="Probe the UDP echo: one datagram, back byte-exact.")
    ] = False,
    proxy_protocol: Annotated[ProxyProtocol, _PROXY_PROTOCOL_OPTION] = ProxyProtocol.OFF,
    proxy_source: Annotated[str | None, _PROXY_SOURCE_OPTION] = None,
    tls: Annotated[bool, _TLS_OPTION] = False,
    tls_ca: Annotated[str | None, _TLS_CA_OPTION] = None,
    tls_insecure: Annotated[bool, _TLS_INSECURE_OPTION] = False,
) -> None:
    """Send one random line and expect it back: exit 0 and the round trip, else exit 1."""
    target = host.split(",")[0].strip()
    name = f"{target}:{port}"
    # The UDP echo has no PROXY protocol: with --udp no header is sent (the
    # variable may well be set in an environment shared with the service).
    claim = None if udp else _proxy_claim(proxy_protocol, proxy_source)
    if udp and tls:
        raise typer.BadParameter("the UDP echo has no TLS", param_hint="'--tls'")
    tls_client = _tls_client(tls, tls_ca, tls_insecure)
    try:
        if udp:
            name = "udp://" + (f"[{target}]:{port}" if ":" in target else name)
            elapsed = trio.run(probe_udp, target, port, timeout)
        else:
            elapsed = trio.run(partial(probe, proxy=claim, tls=tls_client), target, port, timeout)
    except ProbeError as exc:
        typer.echo(f"echosvc check: {name}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ok {name} round trip {elapsed * 1000:.2f} ms")


@app.command()
def bench(
    host: Annotated[
        str, typer.Option(envvar="ECHOSVC_HOST", help="Host to load (the first, if several).")
    ] = _DEFAULTS.hosts[0],
    port: Annotated[
        int, typer.Option(envvar="ECHOSVC_PORT", min=1, max=65535, help="Port to load.")
    ] = _DEFAULTS.port,
    connections: Annotated[int, typer.Option(min=1, help="Connections in all.")] = 50,
    size: Annotated[
        int, typer.Option(min=8, max=2**20, help="Bytes per request, newline included.")
    ] = 64,
    depth: Annotated[
        int, typer.Option(min=1, help="Requests in flight per connection (1: request/response).")
    ] = 1,
    duration: Annotated[float, typer.Option(min=0.1, help="Measured seconds.")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds before measuring.")] = 1.0,
    processes: Annotated[
        int, typer.Option(min=1, help="Load-generating processes sharing the connections.")
    ] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object.")
    ] = False,
    proxy_protocol: Annotated[ProxyProtocol, _PROXY_PROTOCOL_OPTION] = ProxyProtocol.OFF,
    proxy_source: Annotated[str | None, _PROXY_SOURCE_OPTION] = None,
    tls: Annotated[bool, _TLS_OPTION] = False,
    tls_ca: Annotated[str | None, _TLS_CA_OPTION] = None,
    tls_insecure: Annotated[bool, _TLS_INSECURE_OPTION] = False,
    child: Annotated[bool, typer.Option(hidden=True)] = False,
    offset: Annotated[int, typer.Option(hidden=True)] = 0,
) -> None:
    """Load an echo server and verify every echo: requests/s, MB/s, latency.

    Exit status 1 if any echo was wrong or any connection failed.
    """
    if depth * size > 2**20:
        raise typer.BadParameter(
            f"depth x size is {depth * size} bytes in flight per connection; at most 1 MiB",
            param_hint="'--depth' / '--size'",
        )
    shape = LoadShape(
        connections=connections, size=size, depth=depth, warmup=warmup, duration=duration
    )
    target = host.split(",")[0].strip()
    claim = _proxy_claim(proxy_protocol, proxy_source)
    tls_client = _tls_client(tls, tls_ca, tls_insecure)
    if child:
        run_child(target, port, shape, offset, claim, tls_client)
        return
    result = trio.run(
        _bench_with_progress,
        target,
        port,
        shape,
        min(processes, connections),
        claim,
        tls_client,
    )
    summary = result.as_dict()
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        _print_bench_table(target, port, summary)
    if not result.ok:
        raise typer.Exit(1)


async def _bench_with_progress(
    host: str,
    port: int,
    shape: LoadShape,
    processes: int,
    proxy: ProxyClaim | None = None,
    tls: TLSClient | None = None,
) -> BenchResult:
    console = rich.console.Console(stderr=True)
    if not console.is_terminal:
        return await run_bench(host, port, shape, processes, proxy=proxy, tls=tls)
    total = shape.warmup + shape.duration
    last = [0.0, 0]
    with rich.live.Live(console=console, auto_refresh=False, transient=True) as live:

        def show(elapsed: float, completed: int) -> None:
            rate = (completed - last[1]) / max(elapsed - last[0], 1e-9)
            last[:] = [elapsed, completed]
            live.update(
                f"{min(elapsed, total):5.1f}/{total:.1f} s  {rate:12,.0f} req/s  "
                f"{completed:14,d} echoes verified",
                refresh=True,
            )

        return await run_bench(host, port, shape, processes, on_progress=show, proxy=proxy, tls=tls)


def _print_bench_table(host: str, port: int, summary: dict[str, Any]) -> None:
    table = rich.table.Table(title=f"echosvc bench {host}:{port}", show_header=False)
    latency = summary["latency_us"]
    rows = [
        ("connections", f"{summary['connected']} of {summary['connections']}"),
        ("request", f"{summary['size']} B, {summary['depth']} in flight per connection"),
        ("window", f"{summary['duration_s']:g} s after {summary['warmup_s']:g} s warm-up"),
        ("processes", str(summary["processes"])),
        ("requests", f"{summary['requests']:,}"),
        ("requests/s", f"{summary['requests_per_s']:,.0f}"),
        ("MB/s", f"{summary['mb_per_s']:.2f}"),
        (
            "latency p50 / p90 / p99",
            f"{latency['p50']:,.0f} / {latency['p90']:,.0f} / {latency['p99']:,.0f} µs",
        ),
        ("latency p99.9 / max", f"{latency['p999']:,.0f} / {latency['max']:,.0f} µs"),
        ("mismatches", str(summary["mismatches"])),
        ("errors", str(summary["errors"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    rich.console.Console().print(table)
    for sample in summary["error_samples"]:
        typer.echo(f"error: {sample}", err=True)


def main() -> None:
    """Console-script entry point."""
    app()
