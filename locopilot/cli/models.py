"""``locopilot models``: the GGUF files in the models folder."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import msgspec
import rich_click as click
from rich.table import Table
from rich.text import Text

from locopilot.cli import console, database, print_error, settings_or_exit
from locopilot.errors import LocopilotError
from locopilot.models import imports
from locopilot.models.catalog import ModelCatalog
from locopilot.models.download import sha256_file
from locopilot.models.gguf import GGUFError
from locopilot.models.pull import SPLITS
from locopilot.store import models as records
from locopilot.store.models import ModelRecord


def catalog() -> ModelCatalog:
    return ModelCatalog(settings_or_exit().models_path)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


@click.group()
def models() -> None:
    """List, add, remove and inspect local GGUF models."""


@models.command("list")
@click.option("--names", is_flag=True, help="Print only the names, one a line.")
def list_models(names: bool) -> None:
    """List the models in LOCOPILOT_MODELS_DIR."""
    models_catalog = catalog()
    try:
        entries = models_catalog.list()
    except OSError as exc:
        print_error(f"cannot list {models_catalog.models_dir}: {exc.strerror or exc}")
        raise SystemExit(1) from exc
    if names:
        for entry in entries:
            click.echo(entry.name)
        return
    table = Table("name", "size", "arch", "quant", "context", "template", box=None)
    for entry in entries:
        table.add_row(
            entry.name,
            human_size(entry.size_bytes),
            entry.architecture or "?",
            entry.quantization or "?",
            str(entry.context_length or "?"),
            entry.chat_template if entry.error is None else Text(entry.error, style="red"),
        )
    console.print(table if entries else "no models; add one with `locopilot models add PATH`")


@models.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Model name (default: the file name without .gguf).")
@click.option("--link", is_flag=True, help="Symlink the file instead of copying it.")
@click.option(
    "--sha256", "pin", help="The file's expected SHA-256: refused unless it matches; `models verify` checks it."
)
def add_model(path: Path, name: str | None, link: bool, pin: str | None) -> None:
    """Copy (or link) a local GGUF file into the models folder, and record where it came from."""
    if pin is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pin.strip()):
        print_error("--sha256 must be 64 hexadecimal digits")
        raise SystemExit(2)
    digest = None
    if pin is not None or not link:
        digest = sha256_file(path)
        if pin is not None and digest != pin.strip().lower():
            print_error(f"{path} has sha256 {digest}, not {pin.strip().lower()}; nothing was added")
            raise SystemExit(1)
    try:
        entry = catalog().add(path, name=name, link=link)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc
    with database() as db:
        record = ModelRecord(
            name=entry.name,
            source=f"file:{path.resolve()}",
            sha256=digest,
            size=entry.size_bytes,
            pinned=pin is not None,
            arrived_at=time.time(),
        )
        records.put(db, record)
    console.print(f"added {entry.name} ({human_size(entry.size_bytes)}, {entry.quantization})", highlight=False)


@models.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--copy", is_flag=True, help="Copy the files (default: link to them where they are).")
def import_models(folder: Path, copy: bool) -> None:
    """Add the models of an Ollama models folder (~/.ollama/models), a Hugging Face hub cache
    (~/.cache/huggingface/hub), an LM Studio folder or any folder of GGUFs, named as the source names them.

    No network is used. A name that exists already is skipped. Split models are linked, never copied.
    """
    models_catalog = catalog()
    found = imports.found_in(folder)
    if not found:
        print_error(f"no GGUF models found in {folder} (read as {imports.kind_of(folder)})")
        raise SystemExit(1)
    table = Table("name", "from", "result", box=None)
    with database() as db:
        for item in found:
            try:
                entry = models_catalog.add(item.path, name=item.name, link=not copy or item.split)
            except LocopilotError as exc:
                table.add_row(item.name, Text(item.source), Text(f"skipped: {exc.message}", style="yellow"))
                continue
            record = ModelRecord(
                name=entry.name,
                source=item.source,
                sha256=item.sha256,
                size=entry.size_bytes,
                metadata=item.metadata,
                arrived_at=time.time(),
            )
            records.put(db, record)
            how = "linked" if not copy or item.split else "copied"
            table.add_row(entry.name, Text(item.source), Text(how, style="green"))
    console.print(table)


@models.command("verify")
@click.argument("name", required=False)
def verify_models(name: str | None) -> None:
    """Hash model files again and compare with the sha256 recorded when they arrived.

    Exits 1 if a file changed or is missing.
    """
    models_catalog = catalog()
    with database() as db:
        known = records.every(db)
        try:
            entries = [models_catalog.get(name)] if name else models_catalog.list()
        except LocopilotError as exc:
            print_error(exc.message)
            raise SystemExit(1) from exc
        table = Table("name", "state", "sha256", box=None)
        changed = False
        for entry in entries:
            record = known.get(entry.name)
            try:
                digest = sha256_file(models_catalog.load_path(entry.name))
            except (OSError, LocopilotError) as exc:
                table.add_row(entry.name, Text("missing", style="red"), Text(str(exc)))
                changed = True
                continue
            if record is None or record.sha256 is None:
                state = Text("not recorded; recorded now", style="yellow")
                if record is None:
                    record = ModelRecord(
                        name=entry.name, source="unknown", sha256=None, size=entry.size_bytes, arrived_at=time.time()
                    )
                records.put(db, msgspec.structs.replace(record, sha256=digest))
            elif record.sha256 == digest:
                state = Text("ok", style="green")
            else:
                state = Text(f"CHANGED (recorded {record.sha256[:12]}…)", style="bold red")
                changed = True
            table.add_row(entry.name, state, digest)
    console.print(table)
    if changed:
        raise SystemExit(1)


@models.command("rm")
@click.argument("name")
def remove_model(name: str) -> None:
    """Remove a model from the models folder (a link is removed, not its target)."""
    models_catalog = catalog()
    try:
        models_catalog.remove(name)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc
    shutil.rmtree(models_catalog.models_dir / SPLITS / name, ignore_errors=True)
    with database() as db:
        records.delete(db, name)
    console.print(f"removed {name}", highlight=False)


@models.command("show")
@click.argument("name")
def show_model(name: str) -> None:
    """Show a model's metadata."""
    models_catalog = catalog()
    try:
        entry = models_catalog.get(name)
        header = models_catalog.header(name)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc
    except (GGUFError, OSError) as exc:
        print_error(f"cannot read the model {name}: {exc}")
        raise SystemExit(1) from exc
    table = Table("field", "value", box=None)
    table.add_row("name", entry.name)
    table.add_row("path", Text(entry.path))
    table.add_row("size", human_size(entry.size_bytes))
    table.add_row("architecture", str(entry.architecture))
    table.add_row("quantization", str(entry.quantization))
    table.add_row("parameters", "?" if entry.parameter_count is None else f"{entry.parameter_count:,}")
    table.add_row("context length", str(entry.context_length))
    table.add_row("chat template", entry.chat_template)
    for key, value in sorted(header.metadata.items()):
        if key == "tokenizer.chat_template":
            continue
        table.add_row(Text(key), Text(_short(value)))
    console.print(table)


def _short(value: object, limit: int = 100) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
