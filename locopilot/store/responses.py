"""Stored Responses API responses: the ``responses`` and ``response_items`` tables.

A response row keeps the Response object as it was answered (``body``, JSON) and who
created it (``key_id``; NULL on an open server); its input and output items are rows of
``response_items`` in order, so a chain of responses (each naming its
``previous_response_id``) can be replayed as one conversation and an item found by id.
Deleting a response deletes its items; a response that continued it keeps its own.

Writes (:func:`insert`, :func:`delete`) are functions of a connection for
:meth:`Database.submit`; reads block the calling thread, so async code calls them in a
worker thread. Raises :class:`~locopilot.store.db.StoreError` when the database fails.
"""

from __future__ import annotations

from typing import Any

import apsw
import msgspec

from locopilot.store.db import Database
from locopilot.store.upkeep import PURGE_BATCH

#: A chain longer than this is replayed from its latest responses only.
MAX_CHAIN = 10_000


class StoredResponse(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    key_id: str | None
    model: str
    status: str
    previous_response_id: str | None
    created_at: float
    body: str
    """The Response object's JSON."""


class Owner(msgspec.Struct, frozen=True):
    """A stored response's key and body (enough to check who may see it, and to answer it)."""

    key_id: str | None
    body: str


class StoredItem(msgspec.Struct, frozen=True):
    key_id: str | None
    item: dict[str, Any]


def insert(
    conn: apsw.Connection, response: StoredResponse, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]
) -> None:
    """Store ``response`` and its items, each ``(item id, item JSON)``, in order: run it on the writer."""
    conn.execute(
        "INSERT INTO responses (id, key_id, model, status, previous_response_id, created_at, body) "
        "VALUES (:id, :key_id, :model, :status, :previous_response_id, :created_at, :body)",
        msgspec.structs.asdict(response),
    )
    rows = [(response.id, position, 0, item_id, item) for position, (item_id, item) in enumerate(inputs)]
    rows += [(response.id, len(inputs) + n, 1, item_id, item) for n, (item_id, item) in enumerate(outputs)]
    conn.executemany(
        "INSERT INTO response_items (response_id, position, output, item_id, item) VALUES (?, ?, ?, ?, ?)", rows
    )


def delete(conn: apsw.Connection, response_id: str) -> bool:
    """Delete the response and its items; whether there was one. Run it on the writer."""
    conn.execute("DELETE FROM responses WHERE id = ?", (response_id,))
    return conn.changes() == 1


def owner_of(db: Database, response_id: str) -> Owner | None:
    def fetch(conn: apsw.Connection) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(
            "SELECT key_id, body FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        return row

    row = db.read(fetch)
    return None if row is None else Owner(*row)


def conversation(db: Database, response_id: str, *, own_outputs: bool = True) -> list[dict[str, Any]]:
    """The items of ``response_id``'s chain, oldest response first: each one's input items,
    then its output items (``own_outputs`` False leaves out the last response's outputs).

    A response of the chain that was deleted (or purged) ends the chain there.
    """

    def fetch(conn: apsw.Connection) -> list[tuple[str]]:
        return list(
            conn.execute(
                """
                WITH RECURSIVE chain(id, depth) AS (
                    SELECT :id, 0
                    UNION ALL
                    SELECT r.previous_response_id, chain.depth + 1
                    FROM responses AS r JOIN chain ON r.id = chain.id
                    WHERE r.previous_response_id IS NOT NULL AND chain.depth < :max
                )
                SELECT i.item FROM chain JOIN response_items AS i ON i.response_id = chain.id
                WHERE :own_outputs OR chain.depth > 0 OR i.output = 0
                ORDER BY chain.depth DESC, i.position
                """,
                {"id": response_id, "max": MAX_CHAIN, "own_outputs": own_outputs},
            )
        )

    return [msgspec.json.decode(row[0]) for row in db.read(fetch)]


def item(db: Database, item_id: str) -> StoredItem | None:
    """The latest stored item with id ``item_id``, and the key of the response that holds it."""

    def fetch(conn: apsw.Connection) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(
            "SELECT r.key_id, i.item FROM response_items AS i JOIN responses AS r ON r.id = i.response_id "
            "WHERE i.item_id = ? ORDER BY r.created_at DESC LIMIT 1",
            (item_id,),
        ).fetchone()
        return row

    row = db.read(fetch)
    return None if row is None else StoredItem(row[0], msgspec.json.decode(row[1]))


def purge_before(db: Database, cutoff: float) -> int:
    """Delete responses (and their items) created before ``cutoff`` (unix seconds), in batches; how many."""
    deleted = 0
    while True:
        changed = db.write(
            "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM responses WHERE created_at < ? LIMIT ?)",
            (cutoff, PURGE_BATCH),
        ).result()
        deleted += changed
        if changed < PURGE_BATCH:
            return deleted
