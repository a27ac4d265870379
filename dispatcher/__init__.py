"""dispatcher: the master side. It accepts connections and hands them to workers."""

__version__ = "0.1.0"

from dispatcher.config import Config
from dispatcher.master import Master

__all__ = ["Config", "Master", "__version__"]
