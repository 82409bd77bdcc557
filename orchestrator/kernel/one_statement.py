"""New rows of several tables, and a few statements beside them, written by ONE SQL statement.

One round trip instead of one per table (and no ORM unit of work): each table's rows travel as one
JSON parameter (``jsonb_populate_recordset``, so the SQL text is the same whatever the number of
rows and is compiled once), each INSERT is a data-modifying CTE. PostgreSQL runs every CTE of the
statement (foreign keys are checked at its end, so a line may name an order of the same
statement), and in autocommit mode the statement is a transaction of its own: all or nothing.

A *guard* (a boolean SQL expression) gates every INSERT: when it is false nothing is inserted and
``write`` returns False (e.g. the prices a caller cached are no longer the catalogue's).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True)
class Also:
    """A statement run beside the inserts, as a CTE of its own (its SQL's parameters must not
    clash with another's); ``gated``: only when the guard holds."""

    sql: str
    params: dict[str, Any] = field(default_factory=dict)
    gated: bool = False


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"not JSON: {type(value).__name__}")


@lru_cache(maxsize=64)
def _sql(
    tables: tuple[tuple[str, tuple[str, ...]], ...], guard: str, also: tuple[tuple[str, bool], ...]
) -> sa.TextClause:
    ctes = [f"guard AS (SELECT ({guard}) AS ok)"]
    for i, (table, cols) in enumerate(tables):
        names = ", ".join(cols)
        ctes.append(
            f"i{i} AS (INSERT INTO {table} ({names}) SELECT {names} FROM "
            f"jsonb_populate_recordset(NULL::{table}, CAST(:rows_{i} AS jsonb)) "
            f"WITH ORDINALITY AS r WHERE (SELECT ok FROM guard) ORDER BY r.ordinality "
            "RETURNING 1)"
        )
    for j, (sql, gated) in enumerate(also):
        body = f"SELECT 1 FROM guard WHERE ok AND EXISTS ({sql})" if gated else sql
        ctes.append(f"a{j} AS ({body})")
    # Referenced, so that every CTE runs (a plain SELECT CTE runs only if it is read).
    counted = [f"(SELECT count(*) FROM i{i})" for i in range(len(tables))]
    counted += [f"(SELECT count(*) FROM a{j})" for j in range(len(also))]
    return sa.text(f"WITH {', '.join(ctes)} SELECT (SELECT ok FROM guard), {', '.join(counted)}")


def write(
    conn: Any,
    inserts: Sequence[tuple[sa.Table, list[dict[str, Any]]]],
    *,
    guard: tuple[str, dict[str, Any]] = ("true", {}),
    also: Sequence[Also] = (),
) -> bool:
    """Insert every table's rows (each list's rows with the same keys) and run ``also``, in one
    statement on ``conn`` (a Connection or a Session); False: the guard failed, nothing inserted."""
    inserts = [(table, rows) for table, rows in inserts if rows]
    shape = tuple((table.name, tuple(rows[0])) for table, rows in inserts)
    params: dict[str, Any] = dict(guard[1])
    for i, (_, rows) in enumerate(inserts):
        params[f"rows_{i}"] = json.dumps(rows, default=_plain)
    for extra in also:
        params.update(extra.params)
    statement = _sql(shape, guard[0], tuple((a.sql, a.gated) for a in also))
    return bool(conn.execute(statement, params).scalar())
