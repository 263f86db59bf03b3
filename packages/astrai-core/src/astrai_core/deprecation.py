"""Renamed names keep working for one release: the old spelling is accepted, and a deprecation
line says what to write instead.

Used by the typed configs (`ModelConfig`, `TrainConfig`: keyword arguments, attribute reads,
config files) and by the command line (hidden flag aliases, `astrai_core.cli.aliases`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

REMOVAL = "the next release"


def deprecation_message(old: str, new: str, where: str) -> str:
    return f"{where}: '{old}' is deprecated and will be removed in {REMOVAL}; use '{new}'"


def warn_renamed(old: str, new: str, where: str, stacklevel: int = 3) -> None:
    # FutureWarning, not DeprecationWarning: Python shows it to users, not only to developers.
    warnings.warn(deprecation_message(old, new, where), FutureWarning, stacklevel=stacklevel)


def rename_keys(values: Mapping[str, Any], renamed: Mapping[str, str], where: str,
                warn: bool = True) -> dict[str, Any]:
    """`values` with every old key replaced by its new name; both spellings at once is an error."""
    out = dict(values)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"{where}: both '{old}' (deprecated) and '{new}' are given; keep '{new}'")
        if warn:
            warn_renamed(old, new, where, stacklevel=4)
        out[new] = out.pop(old)
    return out


def accept_renamed(renamed: Mapping[str, str]) -> Any:
    """Class decorator for a dataclass: its constructor takes the old keyword names, and reading
    an old attribute name returns the new one, each with a deprecation warning."""

    def decorate(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **rename_keys(kwargs, renamed, cls.__name__))

        def __getattr__(self: Any, name: str) -> Any:
            # Only reached when normal lookup fails, so current names never pay for it.
            if name in renamed:
                warn_renamed(name, renamed[name], cls.__name__)
                return getattr(self, renamed[name])
            raise AttributeError(f"'{cls.__name__}' object has no attribute '{name}'")

        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.__getattr__ = __getattr__  # type: ignore[attr-defined]
        cls.RENAMED = dict(renamed)  # type: ignore[attr-defined]
        return cls

    return decorate
