"""echosvc with its netpoller's choice taken away: for measuring the crossover.

The netpoller chooses by measurement between polling its own edge-triggered
set and letting connections wait through Trio's ``wait_readable``
(`echosvc.netpoll`, "Chosen by measurement"). To measure where that choice
should fall, this runs ``echosvc`` with the choice fixed:

    python bench/peers/echosvc_forced.py poller serve --port 7000 ...
    python bench/peers/echosvc_forced.py trio serve --port 7000 ...

``poller``: always poll (``Netpoller(adapt=False)``); ``trio``: always direct,
every wait through Trio's own I/O manager (sockets are still registered once,
so only the per-wait cost differs). At exit it prints the poller's wake-ups
and events to stderr. Not a product option: echosvc has no such flag.
"""

from __future__ import annotations

import atexit
import sys

import trio

from echosvc import netpoll

MODE = sys.argv.pop(1)
if MODE not in ("poller", "trio"):
    sys.exit("usage: echosvc_forced.py poller|trio serve [echosvc serve options]")

_pollers: list[netpoll.Netpoller] = []
_init = netpoll.Netpoller.__init__


def _forced_init(self: netpoll.Netpoller, **kwargs: object) -> None:
    _init(self, max_events=netpoll.MAX_EVENTS, adapt=False)
    _pollers.append(self)


async def _always_direct(self: netpoll.Netpoller) -> None:
    self.direct = True
    try:
        await trio.sleep_forever()
    finally:
        self._close()


netpoll.Netpoller.__init__ = _forced_init  # type: ignore[method-assign]
if MODE == "trio":
    netpoll.Netpoller.run = _always_direct  # type: ignore[method-assign]


@atexit.register
def _report() -> None:
    for poller in _pollers:
        per = poller.events / poller.wakeups if poller.wakeups else 0.0
        line = f"netpoller wakeups={poller.wakeups} events={poller.events} per_wakeup={per:.2f}"
        print(line, file=sys.stderr)


from echosvc.__main__ import main  # noqa: E402 -- after the patch above

main()
