"""In-reactor fakes for people who build on gwms: run daemons' protocols in memory.

``FakeAuthMethod`` authenticates whoever the client says it is, with no TLS: it exists so that
command handlers, authorization lists and whole pools can be tested on a MemoryReactorClock.
Never list it in a real configuration. ``MemoryNetwork`` connects client protocols to server
factories over iosim's fake transports. ``MemoryPool`` is a whole pool (collector, negotiator,
schedd, startd) on one clock, whose jobs are ``FakeJobProcess``es that run nothing.
"""

from typing import Any

from gwms.testing.auth import FakeAuthMethod
from gwms.testing.network import MemoryNetwork

__all__ = ["FakeAuthMethod", "FakeJobProcess", "MemoryNetwork", "MemoryPool"]


def __getattr__(name: str) -> Any:
    # Imported on first use: configurations name "gwms.testing:FakeAuthMethod", and loading that
    # must not import every daemon of the pool.
    if name == "MemoryPool":
        from gwms.testing.pool import MemoryPool

        return MemoryPool
    if name == "FakeJobProcess":
        from gwms.testing.processes import FakeJobProcess

        return FakeJobProcess
    raise AttributeError(f"module 'gwms.testing' has no attribute {name!r}")
