"""Registry and BaseFactory."""

from __future__ import annotations

import pytest

from astrai_core import AutoModel, BaseFactory, Registry, Transformer


def test_registry_orders_by_priority_and_filters_by_category():
    reg = Registry("widget")
    reg.register("a", int, category="x", priority=0)
    reg.register("b", float, category="y", priority=5)
    reg.register("c", str, category="x", priority=1)
    assert reg.list_names() == ["b", "c", "a"]
    assert reg.list_names("x") == ["c", "a"]
    assert reg.get("b") is float
    with pytest.raises(ValueError, match="unknown widget 'z'; registered: b, c, a"):
        reg.get("z")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", str)


def test_factories_have_separate_registries():
    class Shapes(BaseFactory):
        pass

    class Colors(BaseFactory):
        pass

    @Shapes.register("square")
    class Square:
        def __init__(self, side: int) -> None:
            self.side = side

    assert Shapes.create("square", 3).side == 3
    assert Shapes.list_registered() == ["square"]
    assert Colors.list_registered() == []


def test_automodel_knows_the_transformer():
    assert AutoModel.get_model_class("astrai") is Transformer
    assert "astrai" in AutoModel.list_registered()
