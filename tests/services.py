"""The real-service launchers live in :mod:`simulators.localstack` (the demo uses them too)."""

from simulators.localstack import *  # noqa: F403
from simulators.localstack import __all__  # noqa: F401
