"""``locopilot status`` and ``locopilot usage``: a running server's state and a key's usage, on one screen.

Both talk to the server through :func:`locopilot.cli.remote.connected` (found as every server
command finds it; ``--url``, ``--key-file``) and read its answers with
:func:`~locopilot.cli.remote.checked`.

``status`` reads ``GET /v1/engine/health`` (admin scope): the server, the database, llama.cpp,
the loaded models with their runners, and every provider with its circuit, requests in flight
and last error. It answers 503 while the server is not ready; that answer is shown, not an
error. A key without the admin scope is told so by the server.

``usage`` reads ``GET /v1/locopilot/me`` (any key): who the key is, its scopes and limits,
and its requests and tokens by model over the last day. ``--all`` (admin scope) reads
``GET /v1/locopilot/usage``: every key's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import rich_click as click
from rich.table import Table
from rich.text import Text

from locopilot.cli import console
from locopilot.cli.remote import Choice, checked, connected

CIRCUIT_STYLES = {"closed": "green", "half_open": "yellow", "open": "red"}

url_option = click.option("--url", help="The server's address (default: LOCOPILOT_HOST and LOCOPILOT_PORT).")


def key_option(scope: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--key-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=f"A file holding an API key{scope} (default: the bootstrap admin key).",
    )


def yes_no(value: bool, good: str = "ok", bad: str = "not ready") -> Text:
    return Text(good, style="green") if value else Text(bad, style="red")


@click.command()
@url_option
@key_option(" with the admin scope")
def status(url: str | None, key_file: Path | None) -> None:
    """The running server on one screen: engine, loaded models, providers with their circuits."""
    with connected(Choice(url, key_file), needed_for="status") as client:
        assert client is not None  # needed_for: no server exits
        response = client.get("/v1/engine/health")
        health = response.json() if response.status_code == 503 else checked(response)
        where = str(client.base_url)
    engine = health["engine"]
    database = health["database"]
    summary = Table(box=None, show_header=False)
    summary.add_row("server", Text(where), Text(health["status"], style="green" if health["status"] == "ok" else "red"))
    summary.add_row("database", Text(database["path"]), yes_no(database["ok"], bad=database.get("error") or "error"))
    devices = ", ".join(engine["devices"]) or "CPU"
    version = engine["llama_cpp_version"] or "-"
    summary.add_row("llama.cpp", Text(f"{version} on {devices}"), yes_no(engine["ready"], bad=engine["detail"]))
    summary.add_row("models", Text(engine["models_dir"]), Text(""))
    console.print(summary)

    runners = Table("loaded model", "ctx", "slots", "threads", "in flight", "waiting", "tokens", "idle", box=None)
    for runner in engine["runners"]:
        runners.add_row(
            Text(runner["model"]),
            str(runner["n_ctx"]),
            str(runner["slots"]),
            f"{runner['threads']}/{runner['threads_batch']}",
            str(runner["in_flight"]),
            str(runner["waiting"]),
            str(runner["tokens_generated"]),
            f"{runner['idle_seconds']:.0f}s",
        )
    console.print()
    if engine["runners"]:
        console.print(runners)
    else:
        console.print("no model loaded", highlight=False)

    providers = Table(
        "provider", "locality", "priority", "circuit", "in flight", "probe", "models", "last error", box=None
    )
    for provider in health["providers"]:
        cap = provider.get("max_concurrent")
        probe = provider.get("probe_ms")
        models = provider.get("models")
        providers.add_row(
            Text(provider["name"]),
            provider["locality"],
            str(provider["priority"]),
            Text(provider["circuit"], style=CIRCUIT_STYLES.get(provider["circuit"], "")),
            f"{provider['in_flight']}" + (f"/{cap}" if cap else ""),
            "-" if probe is None else f"{probe:.0f} ms",
            Text("(embedded)" if models is None else ", ".join(models) or "-", overflow="ellipsis"),
            Text(provider["last_error"] or "", style="red", overflow="ellipsis"),
        )
    console.print()
    console.print(providers)


@click.command()
@click.option("--all", "every_key", is_flag=True, help="Every key's usage (needs the admin scope).")
@url_option
@key_option("")
def usage(every_key: bool, url: str | None, key_file: Path | None) -> None:
    """This key's requests and tokens by model over the last day, as the server counts them."""
    with connected(Choice(url, key_file), needed_for="usage") as client:
        assert client is not None
        me = checked(client.get("/v1/locopilot/me"))
        everyone = checked(client.get("/v1/locopilot/usage"))["data"] if every_key else None
    if everyone is not None:
        table = Table("key", "model", "requests", "errors", "tokens in", "tokens out", box=None)
        for row in everyone:
            key = row["key_name"] or row["key_id"] or "(no key)"
            table.add_row(
                Text(key),
                Text(row["model"]),
                str(row["requests"]),
                str(row["errors"]),
                str(row["tokens_in"]),
                str(row["tokens_out"]),
            )
        console.print("every key, last 24 hours", highlight=False)
        console.print(table)
        return
    who = "open mode (the server needs no key)" if me["open"] else f"{me['name']} ({me['key_id']})"
    console.print(Text(f"key: {who}"))
    console.print(Text(f"scopes: {', '.join(me['scopes'])}"))
    if me["models"] is not None:
        console.print(Text(f"models: {', '.join(me['models'])}"))
    if me["privacy"] is not None:
        console.print(Text(f"privacy: {me['privacy']}"))
    rows = me["usage_last_day"]
    table = Table("model", "requests", "errors", "tokens in", "tokens out", box=None)
    for row in rows:
        table.add_row(
            Text(row["model"]), str(row["requests"]), str(row["errors"]), str(row["tokens_in"]), str(row["tokens_out"])
        )
    table.add_row(
        Text("total", style="bold"),
        str(sum(r["requests"] for r in rows)),
        str(sum(r["errors"] for r in rows)),
        str(sum(r["tokens_in"] for r in rows)),
        str(sum(r["tokens_out"] for r in rows)),
    )
    console.print("last 24 hours", highlight=False)
    console.print(table)
