"""relayctl: operate splitrelay (click over manager APIs).

Commands that need the running relayd talk to its control socket
(manager.relay.control_client; `calls`); `flows`, `stats` and `expire` read the
pinned BPF maps directly, so they work while relayd is down or restarting
(`maps`). `calls show` and `calls records` give per-call figures
(`records`). `pki` and `token` make keys and credentials (`keys`); `lab` and
`demo` run the whole system in network namespaces (`lab`, over manager.lab).
The group, its options and errors are in `app`; every table and summary is
formatted in `render`.

Where things are comes from --config (or SPLITRELAY_CONFIG), a lab's config
(--lab PREFIX), or --pin-dir / --socket; the built-in defaults otherwise.
"""

from cli.relayctl import calls, keys, lab, maps, records  # noqa: F401 - each registers its commands on `main`
from cli.relayctl.app import main

__all__ = ["main"]
