"""The ``echosvc`` command line (typer): ``serve``, ``check``, ``--version``.

Every ``serve`` option has an ``ECHOSVC_*`` environment variable, for
systemd's ``EnvironmentFile=`` and for containers; a flag beats its variable.
Values are checked by `echosvc.Config` before anything binds, and a bad one
is a usage error (exit status 2) that names the flag.
"""

from __future__ import annotations

import os
from typing import Annotated

import trio
import typer

from . import daemon, supervisor
from ._version import __version__
from .client import ProbeError, probe
from .config import Config, ConfigError, LogFormat, LogLevel, Mode

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
    log_format: Annotated[
        LogFormat,
        typer.Option(envvar="ECHOSVC_LOG_FORMAT", help="auto: console on a TTY, else JSON."),
    ] = _DEFAULTS.log_format,
    log_level: Annotated[
        LogLevel, typer.Option(envvar="ECHOSVC_LOG_LEVEL", help="Lowest level logged.")
    ] = _DEFAULTS.log_level,
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
            backlog=backlog,
            workers=_parse_workers(workers),
            log_format=log_format,
            log_level=log_level,
        )
    except ConfigError as exc:
        raise typer.BadParameter(exc.message, param_hint=_param_hint(ctx, exc.field)) from None
    address_given = any(
        getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
        for name in ("host", "port")
    )
    run = supervisor.run if config.workers > 1 else daemon.run
    raise typer.Exit(run(config, address_given=address_given))


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


@app.command()
def check(
    host: Annotated[
        str,
        typer.Option(
            envvar="ECHOSVC_HOST",
            help="Host to probe (the first, if the variable lists several).",
        ),
    ] = _DEFAULTS.hosts[0],
    port: Annotated[int, typer.Option(envvar="ECHOSVC_PORT", help="Port to probe.")] = (
        _DEFAULTS.port
    ),
    timeout: Annotated[float, typer.Option(help="Seconds for the whole probe.", min=0.001)] = 2.0,
) -> None:
    """Send one random line and expect it back: exit 0 and the round trip, else exit 1."""
    target = host.split(",")[0].strip()
    try:
        elapsed = trio.run(probe, target, port, timeout)
    except ProbeError as exc:
        typer.echo(f"echosvc check: {target}:{port}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ok {target}:{port} round trip {elapsed * 1000:.2f} ms")


def main() -> None:
    """Console-script entry point."""
    app()
