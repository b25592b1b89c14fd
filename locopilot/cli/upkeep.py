"""``locopilot backup`` and ``locopilot stats``: the state database, copied and summarised."""

from __future__ import annotations

import time
from pathlib import Path

import rich_click as click
from rich.markup import escape
from rich.table import Table

from locopilot.cli import console, database, print_error, settings_or_exit
from locopilot.store import stats as stats_store
from locopilot.store.db import StoreError
from locopilot.store.upkeep import backup as backup_database


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def backup(path: Path) -> None:
    """Copy the state database to PATH, consistently, even while the server runs."""
    settings = settings_or_exit()
    try:
        backup_database(settings.db_path, path)
    except StoreError as exc:
        print_error(str(exc))
        raise SystemExit(1) from exc
    console.print(f"backed up {escape(str(settings.db_path))} to {escape(str(path))}", highlight=False)


@click.command()
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=24.0, show_default=True)
def stats(hours: float) -> None:
    """Usage per API key and model over the last HOURS, from the request log."""
    with database() as db:
        rows = stats_store.usage_by_key(db, time.time() - hours * 3600)
    table = Table("key", "model", "requests", "ok", "errors", "tokens in", "tokens out", "avg ms", box=None)
    for row in rows:
        key = row.key_name or row.key_id or "(no key)"
        latency = "-" if row.avg_latency_ms is None else f"{row.avg_latency_ms:.0f}"
        table.add_row(
            escape(key),
            escape(row.model),
            str(row.requests),
            str(row.ok),
            str(row.errors),
            str(row.tokens_in),
            str(row.tokens_out),
            latency,
        )
    console.print(f"usage over the last {hours:g} hours", highlight=False)
    console.print(table if rows else "no requests")
