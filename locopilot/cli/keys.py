"""``locopilot keys``: API keys, made and revoked in the data folder's database directly.

A running server sees a new or revoked key on its next request. Each change is
written to the audit trail as done from the command line.
"""

from __future__ import annotations

import getpass
import time
from datetime import UTC, datetime

import msgspec
import rich_click as click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from locopilot.cli import console, database, errors, print_error
from locopilot.errors import LocopilotError
from locopilot.settings import Privacy
from locopilot.store import audit, keys
from locopilot.store.db import Database
from locopilot.store.keys import SCOPES, KeySpec


def audited(db: Database, event: str, key: keys.ApiKey) -> None:
    """Write ``event`` for ``key`` to the audit trail, as done by this OS user on the command line."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = "?"
    detail = {"key": key.id, "name": key.name, "user": user}
    audit.record(db, audit.AuditEvent(created_at=time.time(), event=event, client="cli", detail=detail))


def listed_values(values: tuple[str, ...]) -> list[str]:
    """Values given as repeated options, comma-separated, or both."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


@click.group("keys")
def keys_group() -> None:
    """Create, list and revoke API keys.

    While no key exists (and LOCOPILOT_ADMIN_KEY is unset) a server on a loopback
    address answers without one; the first key turns authentication on for good.
    """


@keys_group.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    metavar="SCOPE",
    help=f"What the key may do, repeated or comma-separated: {', '.join(SCOPES)} (default: inference).",
)
@click.option(
    "--models",
    multiple=True,
    metavar="MODELS",
    help="Models the key may use, repeated or comma-separated; `provider:model` pins a provider, "
    "`provider:*` allows all of one provider (default: every model).",
)
@click.option(
    "--privacy",
    type=click.Choice(["local_only", "local_preferred", "any"]),
    help="The loosest routing policy for this key's requests; an X-Routing-Privacy header cannot loosen it.",
)
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute allowed to this key.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute allowed to this key.")
@click.option("--expires", metavar="WHEN", help="When the key stops working: 30d, 12h, 90m, or a date (2030-01-31).")
def create_key(
    name: str,
    scopes: tuple[str, ...],
    models: tuple[str, ...],
    privacy: Privacy | None,
    rpm: int | None,
    tpm: int | None,
    expires: str | None,
) -> None:
    """Create a key and print its secret, once: only a hash is stored.

    The secret goes to standard output alone (KEY=$(locopilot keys create ci) works);
    what the key may do goes to standard error.
    """
    unknown = sorted(set(listed_values(scopes)) - set(SCOPES))
    if unknown:
        print_error(f"unknown scope {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}")
        raise SystemExit(2)
    fields: dict[str, object] = {"name": name, "privacy": privacy, "rpm": rpm, "tpm": tpm, "expires": expires}
    if scopes:
        fields["scopes"] = listed_values(scopes)
    if models:
        fields["models"] = listed_values(models)
    try:
        spec = msgspec.convert(fields, KeySpec)
    except msgspec.ValidationError as exc:
        print_error(f"invalid key: {exc}")
        raise SystemExit(2) from exc
    with database() as db:
        try:
            key, secret = keys.create(db, spec, time.time())
        except LocopilotError as exc:
            print_error(exc.message)
            raise SystemExit(1) from exc
        audited(db, "key_created", key)
    click.echo(secret)
    errors.print(
        f"created {key.id} ({key.name}): scopes {', '.join(key.scopes)}"
        f"; models {', '.join(key.models) if key.models else 'all'}"
        f"; privacy {key.privacy or 'not pinned'}; expires {when(key.expires_at)}",
        highlight=False,
        markup=False,
    )
    errors.print("Store the key now: it cannot be shown again.", style="bold", highlight=False)


@keys_group.command("list")
def list_keys() -> None:
    """List keys (revoked and expired too) by id, name and the first characters of the secret."""
    with database() as db:
        found = keys.listed(db)
    if not found:
        console.print("no keys; create one with `locopilot keys create NAME`")
        return
    now = time.time()
    table = Table(
        "id", "name", "prefix", "scopes", "models", "privacy", "rpm", "tpm", "state", "expires", "last used", box=None
    )
    for key in found:
        state = key.state_at(now)
        table.add_row(
            key.id,
            Text(key.name),
            key.prefix + "…",
            ",".join(key.scopes),
            Text(",".join(key.models)) if key.models else "all",
            key.privacy or "-",
            str(key.rpm or "-"),
            str(key.tpm or "-"),
            Text(state, style="green" if state == "active" else "red"),
            when(key.expires_at),
            when(key.last_used_at),
        )
    console.print(table)


@keys_group.command("revoke")
@click.argument("key")
def revoke_key(key: str) -> None:
    """Revoke KEY (its id, or the name of a live key); it fails from the server's next request on."""
    with database() as db:
        try:
            found = keys.find(db, key)
            revoked = keys.revoke(db, found.id, time.time())
        except LocopilotError as exc:
            print_error(exc.message)
            raise SystemExit(1) from exc
        audited(db, "key_revoked", revoked)
    console.print(f"revoked {revoked.id} ({escape(revoked.name)})", highlight=False)
