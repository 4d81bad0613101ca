"""Model instances from hand-written SQL, for the hot paths (pull, heartbeat, report, authentication).

The ORM compiles a query on every call; for the few statements every request
runs, that costs more than the database does. These helpers read whole rows
with a plain cursor, by column name, and build the same model instances the ORM
would. A model's columns are selected as `<prefix>__<column>`, so one statement
can bring several models' rows side by side without reading anything by position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import connection, models


def select_list(model: type[models.Model], alias: str, prefix: str | None = None) -> str:
    """`alias.col AS prefix__col, ...` for every concrete field of `model`."""
    prefix = prefix or alias
    return ", ".join(f"{alias}.{field.column} AS {prefix}__{field.column}" for field in model._meta.concrete_fields)


def column_names(cursor) -> list[str]:
    """The names of the columns of `cursor`'s current result (a Django cursor or psycopg's), read from the
    result itself: `cursor.description` builds a `Column` object for each, which a hot path's wide rows (the
    pull's 70 columns) made a measurable cost."""
    raw = getattr(cursor, "cursor", cursor)
    result = getattr(raw, "pgresult", None)
    if result is None:
        return [column.name for column in cursor.description]
    return [result.fname(i).decode() for i in range(result.nfields)]


def fetch_named(cursor) -> dict[str, Any] | None:
    """The next row of `cursor` as {column name: value}, or None."""
    row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip(column_names(cursor), row))


def fetch_all_named(cursor) -> list[dict[str, Any]]:
    """Every remaining row of `cursor` as {column name: value}."""
    found = cursor.fetchall()  # first: in a pipeline it waits for this cursor's own result
    names = column_names(cursor)
    return [dict(zip(names, row)) for row in found]


def from_named(model: type[models.Model], values: Mapping[str, Any], prefix: str) -> models.Model | None:
    """An instance of `model` from the `prefix__<column>` values of a row, converted as the ORM converts them;
    None when the row has no such instance (a LEFT JOIN that found nothing: the primary key is NULL)."""
    fields = model._meta.concrete_fields
    if values[f"{prefix}__{model._meta.pk.column}"] is None:
        return None
    converted = []
    for field in fields:
        value = values[f"{prefix}__{field.column}"]
        if value is not None and hasattr(field, "from_db_value"):
            value = field.from_db_value(value, None, connection)
        converted.append(value)
    return model.from_db(connection.alias, [field.attname for field in fields], converted)


def json_value(value: Any) -> Any:
    """A json/jsonb value as psycopg returns it (decoded, or text when cast to json in a composite)."""
    import json

    return json.loads(value) if isinstance(value, str) else value
