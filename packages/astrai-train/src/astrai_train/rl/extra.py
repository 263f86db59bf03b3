"""The optional `rl` extra: online RL samples through astrai-serve, which training-only
installs do not have."""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = ("online GRPO needs astrai-serve: pip install 'astrai-train[rl]' "
                "(uv: uv sync --extra rl / uv add 'astrai-train[rl]')")


def require_serve() -> ModuleType:
    try:
        import astrai_serve
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return astrai_serve
