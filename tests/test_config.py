"""The frozen config: DESIGN.md's defaults, and errors that name the field."""

from __future__ import annotations

import math

import attrs
import pytest

from echosvc.config import (
    Config,
    ConfigError,
    LogFormat,
    LogLevel,
    Mode,
    config_from_json,
    config_to_json,
    seconds_or_never,
)


def test_defaults_are_the_documented_ones() -> None:
    config = Config()
    assert config.hosts == ("127.0.0.1",)
    assert config.port == 9000
    assert config.mode is Mode.LINE
    assert config.read_timeout == 300
    assert config.write_timeout == 30
    assert config.max_line_bytes == 65536
    assert config.max_connections == 10000
    assert config.shutdown_grace == 10
    assert config.backlog is None
    assert config.log_format is LogFormat.AUTO
    assert config.log_level is LogLevel.INFO


def test_config_is_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Config().port = 1  # type: ignore[misc]


def test_strings_become_enums_and_a_single_host_a_tuple() -> None:
    config = Config(mode="stream", log_format="json", log_level="debug", hosts="::1")
    assert config.mode is Mode.STREAM
    assert config.log_format is LogFormat.JSON
    assert config.log_level is LogLevel.DEBUG
    assert config.hosts == ("::1",)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"port": 65536}, "port", "between 0 and 65535"),
        ({"port": -1}, "port", "between 0 and 65535"),
        ({"port": "80"}, "port", "whole number"),
        ({"read_timeout": -0.5}, "read_timeout", ">= 0"),
        ({"write_timeout": math.nan}, "write_timeout", ">= 0"),
        ({"shutdown_grace": math.inf}, "shutdown_grace", ">= 0"),
        ({"read_timeout": "10"}, "read_timeout", "number of seconds"),
        ({"max_line_bytes": 0}, "max_line_bytes", "at least 1"),
        ({"max_connections": 0}, "max_connections", "at least 1"),
        ({"backlog": 0}, "backlog", "at least 1"),
        ({"mode": "lines"}, "mode", "one of line, stream"),
        ({"log_format": "xml"}, "log_format", "one of auto, json, console"),
        ({"log_level": "loud"}, "log_level", "one of debug, info, warning, error"),
        ({"hosts": ()}, "hosts", "at least one host"),
        ({"hosts": ("",)}, "hosts", "not a host"),
    ],
)
def test_invalid_values_name_their_field(
    changes: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**changes)  # type: ignore[arg-type]
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value).startswith(f"{field}: ")


def test_zero_disables_a_timeout() -> None:
    assert Config(read_timeout=0, write_timeout=0, shutdown_grace=0).read_timeout == 0
    assert seconds_or_never(0) == math.inf
    assert seconds_or_never(2.5) == 2.5


def test_evolve_validates_too() -> None:
    assert Config().evolve(port=0).port == 0
    with pytest.raises(ConfigError):
        Config().evolve(port=100000)


def test_a_config_survives_json_exactly_every_field() -> None:
    """How a supervisor hands a worker its configuration: nothing may be lost
    or rounded, whatever the field's type, fields added later included."""
    changed = Config(
        hosts=("0.0.0.0", "::1"),
        port=1,
        mode="stream",
        read_timeout=0.1 + 0.2,  # a float that no decimal string round-trips by accident
        write_timeout=0,
        max_line_bytes=7,
        max_connections=3,
        shutdown_grace=2.5,
        proxy_protocol="any",
        proxy_trusted=("10.0.0.0/8", "2001:db8::/32"),
        proxy_timeout=1.25,
        max_per_source=9,
        tls_cert="/etc/echosvc/tls.crt",
        tls_key="/etc/echosvc/tls.key",
        tls_client_ca="/etc/echosvc/clients.pem",
        tls_min_version="1.2",
        tls_handshake_timeout=2.5,
        backlog=17,
        workers=4,
        worker_timeout=0,
        log_format="console",
        log_level="debug",
        udp=True,
        udp_max_bytes=512,
        udp_rate=7,
        metrics="127.0.0.1:9180",
    )
    for config in (Config(), changed):
        assert config_from_json(config_to_json(config)) == config
    defaults = Config()
    unchanged = [
        f.name
        for f in attrs.fields(Config)
        if getattr(changed, f.name) == getattr(defaults, f.name)
    ]
    assert unchanged == [], f"give these a non-default value above: {unchanged}"
