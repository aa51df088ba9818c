"""In-reactor fakes for people who build on gwms: run daemons' protocols in memory.

``FakeAuthMethod`` authenticates whoever the client says it is, with no TLS: it exists so that
command handlers, authorization lists and whole pools can be tested on a MemoryReactorClock.
Never list it in a real configuration. ``MemoryNetwork`` connects client protocols to server
factories over iosim's fake transports.
"""

from gwms.testing.auth import FakeAuthMethod
from gwms.testing.network import MemoryNetwork

__all__ = ["FakeAuthMethod", "MemoryNetwork"]
