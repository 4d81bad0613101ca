"""Model instances from hand-written SQL, for the hot paths (pull, heartbeat, report, authentication).

The ORM compiles a query on every call; for the few statements every request
runs, that costs more than the database does. These helpers read whole rows
with a plain cursor and build the same model instances the ORM would.
"""

from __future__ import annotations

from typing import Any

from django.db import connection, models


def select_list(model: type[models.Model], alias: str) -> str:
    """`alias.col, ...` for every concrete field of `model`, in field order."""
    return ", ".join(f"{alias}.{field.column}" for field in model._meta.concrete_fields)


def width(model: type[models.Model]) -> int:
    return len(model._meta.concrete_fields)


def from_row(model: type[models.Model], values: list[Any] | tuple[Any, ...]) -> models.Model:
    """An instance of `model` from values in `select_list` order, converted as the ORM converts them."""
    fields = model._meta.concrete_fields
    converted = list(values)
    for index, field in enumerate(fields):
        if converted[index] is not None and hasattr(field, "from_db_value"):
            converted[index] = field.from_db_value(converted[index], None, connection)
    return model.from_db(connection.alias, [field.attname for field in fields], converted)
