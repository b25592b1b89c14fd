"""The ``locopilot`` command line. Each command group is its own module."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import rich_click as click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from locopilot import __version__
from locopilot.settings import Settings, SettingsError, effective_items, load_settings

if TYPE_CHECKING:
    from locopilot.store.db import Database

console = Console()
errors = Console(stderr=True)


def print_error(message: str) -> None:
    """Print ``message`` to standard error as an error; brackets in it (paths, names) are not rich markup."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def settings_or_exit() -> Settings:
    """The settings from the environment; a bad value ends the command with status 2."""
    try:
        return load_settings(os.environ)
    except SettingsError as exc:
        print_error(str(exc))
        raise SystemExit(2) from exc


@contextmanager
def database() -> Iterator[Database]:
    """The state database, closed (its writes committed) on the way out; exits 1 if it cannot open."""
    from locopilot.store.db import Database, StoreError

    settings = settings_or_exit()
    try:
        db = Database.open(settings.db_path)
    except StoreError as exc:
        print_error(str(exc))
        raise SystemExit(1) from exc
    try:
        yield db
    finally:
        db.close()


#: The commands kept in modules of their own, as ``name: "module:object"`` under
#: ``locopilot.cli``, imported when the command runs or help lists it: importing them
#: all (httpx, aiohttp, jinja2, llama.cpp's probe) took 0.6 s of every start, `serve`'s
#: included, which needs none of them.
COMMANDS = {
    "backup": "upkeep:backup",
    "chat": "chat:chat",
    "doctor": "doctor:doctor",
    "expose": "expose:expose",
    "jobs": "jobs:jobs",
    "keys": "keys:keys_group",
    "models": "models:models",
    "pull": "pull:pull",
    "service": "service:service",
    "stats": "upkeep:stats",
    "status": "status:status",
    "train": "train:train",
    "usage": "status:usage",
}


class LazyGroup(click.RichGroup):
    """A group whose :data:`COMMANDS` are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module, name = COMMANDS[cmd_name].split(":")
            command = getattr(importlib.import_module(f"locopilot.cli.{module}"), name)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="locopilot")
def cli() -> None:
    """locopilot: one OpenAI-compatible endpoint for local models.

    Configure with LOCOPILOT_* environment variables (`locopilot config` shows them).
    """


@cli.command()
def serve() -> None:
    """Serve the API on LOCOPILOT_HOST:LOCOPILOT_PORT until stopped."""
    from locopilot import server

    raise SystemExit(server.main())


@cli.command()
def config() -> None:
    """Print the effective settings (secrets masked)."""
    settings = settings_or_exit()
    table = Table("variable", "value", box=None)
    for variable, value in effective_items(settings):
        table.add_row(variable, Text(value or "(not set)"))
    console.print(table)


@cli.command()
def version() -> None:
    """Print locopilot's version and llama.cpp's, if it loads."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        engine = package_version("llama-cpp-python")
    except PackageNotFoundError:
        engine = "not installed"
    console.print(f"locopilot {__version__}\nllama-cpp-python {engine}", highlight=False)
