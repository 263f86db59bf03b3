"""A small generic registry and the factory base class built on it.

One `Registry` serves every place the seed asks for registration: model types, datasets,
strategies, schedulers and callbacks. Each `BaseFactory` subclass gets a registry of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    component: Any
    category: str | None
    priority: int


class Registry:
    """Name -> component, with an optional category and a priority used to order listings."""

    def __init__(self, kind: str = "component") -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry] = {}

    def register(
        self, name: str, component_cls: Any, category: str | None = None, priority: int = 0
    ) -> None:
        if name in self._entries and self._entries[name].component is not component_cls:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = RegistryEntry(name, component_cls, category, priority)

    def get(self, name: str) -> Any:
        try:
            return self._entries[name].component
        except KeyError:
            known = ", ".join(self.list_names()) or "none"
            raise ValueError(f"unknown {self.kind} '{name}'; registered: {known}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def list_names(self, category: str | None = None) -> list[str]:
        entries = [e for e in self._entries.values() if category is None or e.category == category]
        entries.sort(key=lambda e: (-e.priority, e.name))
        return [e.name for e in entries]


class BaseFactory(Generic[T]):
    """Base for factories: subclasses register components by name and create them by name."""

    _registry: ClassVar[Registry]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Each factory has its own namespace, unless a subclass of a factory's product
        # (e.g. Transformer under AutoModel) should share its parent's registry.
        if "_registry" not in cls.__dict__ and not getattr(cls, "_share_registry", False):
            cls._registry = Registry(kind=cls.__name__)

    @classmethod
    def register(
        cls, name: str, category: str | None = None, priority: int = 0
    ) -> Callable[[type[T]], type[T]]:
        def decorator(component: type[T]) -> type[T]:
            cls._registry.register(name, component, category, priority)
            return component

        return decorator

    @classmethod
    def create(cls, name: str, *args: Any, **kwargs: Any) -> T:
        return cls._registry.get(name)(*args, **kwargs)

    @classmethod
    def list_registered(cls, category: str | None = None) -> list[str]:
        return cls._registry.list_names(category)
