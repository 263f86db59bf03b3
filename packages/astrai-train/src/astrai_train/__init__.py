"""astrai-train."""

from importlib.metadata import version as _version

__version__ = _version("astrai-train")
