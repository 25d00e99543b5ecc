"""A read-only catalog the example API serves: enough data to exercise real routes."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, Field

__all__ = ["CATALOG", "Item"]


class Item(BaseModel):
    id: int
    name: str
    price: Decimal = Field(decimal_places=2)
    tags: list[str]


_NAMES = ("anvil", "bolt", "crate", "drill", "easel", "funnel", "gauge", "hinge", "jack", "kettle")
_TAGS = ("tools", "storage", "workshop", "garden", "kitchen")

CATALOG: dict[int, Item] = {
    i: Item(
        id=i,
        name=f"{_NAMES[(i - 1) % len(_NAMES)]} #{i}",
        price=Decimal(i * 137 % 9000 + 199) / 100,
        tags=[_TAGS[i % len(_TAGS)], _TAGS[(i * 3) % len(_TAGS)]],
    )
    for i in range(1, 51)
}
