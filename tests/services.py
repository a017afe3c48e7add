"""The real-service launchers live in :mod:`simulators.servers` (the demo uses them too)."""

from simulators.servers import *  # noqa: F403
from simulators.servers import __all__  # noqa: F401
