"""dispatcher: the master side. It accepts connections and hands them to workers."""

from dispatcher.config import Config
from dispatcher.master import Master
from dispatcher.version import __version__

__all__ = ["Config", "Master", "__version__"]
