"""The connection pipeline: the stages a connection passes through before its echo.

An accepted connection does not go straight to the echo. In front of it may
sit a PROXY protocol header naming the real client, a per-source limit keyed
on that client, a TLS handshake -- each one a *stage*. A stage is an object
with one coroutine, `Stage.open`, that takes what is known about the
connection so far (a `Link`: the stream, who the client is, the bytes a
stage read beyond what it needed) and returns what the next stage gets, or
raises `Refused` with the reason to close. `echosvc.connection.Connection`
runs the stages in order inside the connection's own handler task (never in
the accept loop, so no stage can stall accepting), each under its own
deadline (`Stage.timeout`, reason `Stage.timeout_reason`), and then the echo,
which is the last stage.

The contract every stage gets from the runner:

* **its own deadline, its own reasons.** When the stage's deadline fires the
  connection closes with ``timeout_reason``; a `Refused` closes it with the
  reason the stage chose. A stop (`Connection.stop`) that lands while a stage
  waits closes the connection at once with ``shutdown``: it has nothing to
  drain. The runner names the reason from the owner that fired first (the
  deadline or the stop), never from what the stage was doing.
* **no echo after a refusal.** A connection closed by a stage is closed the
  hard way (`trio.aclose_forcefully`): no polite close, no linger, no byte
  echoed.
* **nothing lost at the seam.** Bytes a stage received beyond its own (the
  first bytes of a TLS ClientHello in the same segment as a PROXY header, the
  first line after it) travel in `Link.pending` and are the next stage's first
  bytes.
* **release however it ends.** `Stage.close` is called once the connection
  has ended -- normally, refused by a later stage, cancelled -- for every
  stage whose `open` returned, in reverse order, so a stage that took a slot
  (a per-source count) gives it back.

Stages know nothing of the server, and the server knows the stage list
(`stages_for`), not what each stage does: a new protocol in front of the
echo is one new `Stage` and one line in `stages_for`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from .config import CloseReason, Config, ProxyProtocol

__all__ = ["Link", "Refused", "Stage", "stages_for"]


@attrs.frozen
class Link:
    """What is known about a connection as it passes from stage to stage.

    Attributes:
      stream: the stream the next stage reads and writes (a TLS stage hands
          on the `trio.SSLStream` it wrapped around the one it got).
      peer: the client as ``"host:port"`` for the logs (``peer`` of
          ``connection_closed``).
      address: the client's socket address (``(host, port, ...)``), if known:
          from ``accept()``, or from a PROXY header that names the real client.
      pending: bytes received beyond what the stage that read them needed;
          they are the next stage's first bytes (the echo's, in the end).
      fields: extra ``connection_closed`` fields a stage contributes, such as
          ``proxy`` (the load balancer) or ``tls_version``, as ``(name, value)``
          pairs.

    """

    stream: trio.abc.Stream
    peer: str | None = None
    address: tuple[Any, ...] | None = None
    pending: bytes = b""
    fields: tuple[tuple[str, str], ...] = ()

    def evolve(self, **changes: Any) -> Link:
        """A copy with ``changes``; what a stage returns."""
        return attrs.evolve(self, **changes)

    def with_field(self, name: str, value: str) -> Link:
        """A copy with one more ``connection_closed`` field."""
        return attrs.evolve(self, fields=(*self.fields, (name, value)))


class Refused(Exception):
    """Raised by `Stage.open` to close the connection with ``reason``.

    Args:
      reason: the ``reason`` of ``connection_closed``.
      detail: a short explanation for the logs (``detail`` field), if any.
      quiet: log ``connection_closed`` at ``debug`` rather than ``info``, for
          refusals a flood could otherwise turn into a flood of records (the
          per-source limit).

    """

    def __init__(self, reason: CloseReason, detail: str | None = None, *, quiet: bool = False):
        super().__init__(detail or reason.value)
        self.reason = reason
        self.detail = detail
        self.quiet = quiet


class Stage(abc.ABC):
    """One step of the pipeline before the echo.

    Subclasses set `timeout` (seconds the stage may take; ``0`` or less: no
    deadline of its own) and `timeout_reason`, and implement `open`.
    """

    timeout: float = 0.0
    timeout_reason: CloseReason = CloseReason.ERROR

    @abc.abstractmethod
    async def open(self, link: Link) -> Link:
        """Run the stage on ``link``; return the `Link` for the next stage.

        Raises:
          Refused: to close the connection with a reason of the stage's own.
          trio.BrokenResourceError: the peer went away (reason ``reset``).

        """

    def close(self, link: Link) -> None:  # noqa: B027 -- most stages hold nothing
        """The connection has ended; release what `open` took. Not a checkpoint.

        ``link`` is what `open` returned. Called for every stage whose `open`
        returned, in reverse order, however the connection ended.
        """


def stages_for(config: Config) -> Sequence[Stage]:
    """The stages ``config`` asks for, in pipeline order.

    This is the one place that knows the pipeline's order (DESIGN.md: PROXY
    header, per-source limit, TLS handshake, then the echo). The per-source
    limit comes after the PROXY header because it is keyed on the real
    client the header names, and before the handshake, the costly part.
    Each call builds new stages: a server's stages (and so its per-source
    counts and its TLS contexts) are its own.

    Raises:
      echosvc.tls.TLSLoadError: a ``--tls-*`` file cannot be used.
    """
    # Imported here: the stage modules import this one for `Stage`.
    from .limits import SourceLimitStage
    from .proxyproto import ProxyStage
    from .tls import TLSStage

    stages: list[Stage] = []
    if config.proxy_protocol is not ProxyProtocol.OFF:
        stages.append(ProxyStage.from_config(config))
    if config.max_per_source:
        stages.append(SourceLimitStage(config.max_per_source))
    if config.tls_cert is not None:
        # Loads the files: raises echosvc.tls.TLSLoadError if they are unusable.
        stages.append(TLSStage.from_config(config))
    return tuple(stages)
