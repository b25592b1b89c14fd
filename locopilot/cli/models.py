"""``locopilot models``: the embedded engine's GGUF models, through the running server or in the local folder.

Every command asks the server first (:mod:`locopilot.cli.remote`: the routes under
``/v1/locopilot/models`` do the work); when none answers it works on the local models
folder with the same code the routes run (:mod:`locopilot.models.arrivals`), and says so
on standard error. Paths (``add``, ``import``) are this machine's, which the server shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import rich_click as click
from rich.table import Table
from rich.text import Text

from locopilot.cli import console, database, print_error, settings_or_exit
from locopilot.cli.remote import Choice, Hint, checked, connected, server_options
from locopilot.errors import LocopilotError
from locopilot.models import arrivals
from locopilot.models.arrivals import Imported, ImportReport, Verification
from locopilot.models.catalog import ModelCatalog, validate_model_name
from locopilot.models.gguf import GGUFError
from locopilot.schemas.openai import ModelCard, ModelList, model_card
from locopilot.store import models as records

MODELS = "/v1/locopilot/models"


def catalog() -> ModelCatalog:
    return ModelCatalog(settings_or_exit().models_path)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


@contextmanager
def local_work() -> Iterator[None]:
    """Ends the command with status 1 and the message of a LocopilotError raised inside."""
    try:
        yield
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc


def named(name: str) -> str:
    """``name`` if it is a valid model name (before it goes into a URL); otherwise the command ends with 1."""
    with local_work():
        return validate_model_name(name)


def decoded(response: httpx.Response, kind: type[Any], hint: Hint | None = None) -> Any:
    """A successful answer decoded as ``kind``; an error answer ends the command (see :func:`checked`)."""
    checked(response, hint=hint)
    return msgspec.json.decode(response.content, type=kind)


def unseen(path: Path) -> Hint:
    """A hint for a path the server says is missing although this command sees it."""

    def hint(error: dict[str, Any]) -> str | None:
        if error.get("code") == arrivals.NOT_FOUND and path.exists():
            return (
                f"the server cannot see {path}, which is here: a system service reads no home folders "
                "(ProtectHome=); put it where the service can read it, e.g. under /srv or /var/lib/locopilot"
            )
        return None

    return hint


@click.group()
def models() -> None:
    """List, add, import, remove, verify, load and inspect the embedded engine's GGUF models.

    They ask the running server (LOCOPILOT_HOST and LOCOPILOT_PORT, from the environment or the
    service's env file), and work on the local models folder when none answers.
    """


@models.command("list")
@click.option("--names", is_flag=True, help="Print only the names, one a line.")
@server_options
def list_models(names: bool, server: Choice) -> None:
    """List the models."""
    with connected(server) as client:
        if client is not None:
            cards: list[ModelCard] = decoded(client.get(MODELS), ModelList).data
        else:
            cards = _local_cards()
    if names:
        for card in cards:
            click.echo(card.id)
        return
    table = Table("name", "size", "arch", "quant", "context", "template", box=None)
    for card in cards:
        table.add_row(
            card.id,
            human_size(card.size_bytes or 0),
            card.architecture or "?",
            card.quantization or "?",
            str(card.context_length or "?"),
            card.chat_template if card.error is None else Text(card.error, style="red"),
        )
    console.print(table if cards else "no models; add one with `locopilot models add PATH` or `locopilot pull REF`")


def _local_cards() -> list[ModelCard]:
    models_catalog = catalog()
    try:
        entries = models_catalog.list()
    except OSError as exc:
        print_error(f"cannot list {models_catalog.models_dir}: {exc.strerror or exc}")
        raise SystemExit(1) from exc
    return [model_card(entry, loaded=False) for entry in entries]


@models.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Model name (default: the file name without .gguf).")
@click.option("--link", is_flag=True, help="Symlink the file instead of copying it.")
@click.option(
    "--sha256", "pin", help="The file's expected SHA-256: refused unless it matches; `models verify` checks it."
)
@server_options
def add_model(path: Path, name: str | None, link: bool, pin: str | None, server: Choice) -> None:
    """Copy (or link) a GGUF file into the models folder, and record where it came from.

    Of a split model (-00001-of-0000N.gguf), name the first part: the others come with it.
    """
    try:
        pin = arrivals.check_pin(pin)
    except LocopilotError as exc:
        print_error("--sha256 must be 64 hexadecimal digits")
        raise SystemExit(2) from exc
    path = path.absolute()  # not resolved: a split's parts are found by the name given
    with connected(server) as client:
        if client is not None:
            body = {"path": str(path), "name": name, "link": link, "sha256": pin}
            card: ModelCard = decoded(client.post(MODELS, json=body), ModelCard, unseen(path))
            quantization = card.quantization
            size = card.size_bytes or 0
            added = card.id
        else:
            with local_work(), database() as db:
                entry = arrivals.add_file(catalog(), db, path, name=name, link=link, pin=pin)
            added, quantization, size = entry.name, entry.quantization, entry.size_bytes
    console.print(f"added {added} ({human_size(size)}, {quantization})", highlight=False)


@models.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--copy", is_flag=True, help="Copy the files (default: link to them where they are).")
@server_options
def import_models(folder: Path, copy: bool, server: Choice) -> None:
    """Add the models of an Ollama models folder (~/.ollama/models), a Hugging Face hub cache
    (~/.cache/huggingface/hub), an LM Studio folder or any folder of GGUFs, named as the source names them.

    No network is used. A name that exists already is skipped. Split models come whole, linked or copied.
    """
    folder = folder.absolute()
    with connected(server) as client:
        if client is not None:
            response = client.post(f"{MODELS}/import", json={"folder": str(folder), "copy": copy})
            found: list[Imported] = decoded(response, ImportReport, unseen(folder)).data
        else:
            with local_work(), database() as db:
                found = arrivals.import_folder(catalog(), db, folder, copy=copy)
    table = Table("name", "from", "result", box=None)
    for item in found:
        result = Text(f"skipped: {item.reason}", style="yellow") if item.reason else Text(item.result, style="green")
        table.add_row(item.name, Text(item.source), result)
    console.print(table)


@models.command("adapter")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base", required=True, help="The model in the models folder the adapter was trained on.")
@click.option("--name", required=True, help="The adapter's model name.")
def add_adapter(folder: Path, base: str, name: str) -> None:
    """Convert a LoRA adapter folder to a GGUF LoRA adapter of BASE in the local models folder:
    PEFT's (adapter_config.json and adapter_model.safetensors, as Unsloth, Axolotl and PEFT write
    them) or MLX-LM's (adapter_config.json and adapters.safetensors).

    The server serves it at once beside its base, on the base's runner.
    """
    from locopilot.training import peft

    with local_work():
        entry = peft.import_folder(catalog(), folder, named(base), named(name))
    console.print(f"added {entry.name} ({human_size(entry.size_bytes)}), a LoRA adapter of {base}", highlight=False)


@models.command("merge")
@click.argument("adapter")
@click.option("--name", help="The merged model's name (default: ADAPTER-merged).")
@click.option(
    "--type",
    "out_type",
    type=click.Choice(["f16", "f32", "source"]),
    default="f16",
    show_default=True,
    help="Type of the changed tensors: f16, f32, or the base's own (requantized; small changes may round away).",
)
def merge_adapter(adapter: str, name: str | None, out_type: str) -> None:
    """Merge the LoRA adapter ADAPTER into its base: a standalone GGUF in the local models folder, for export.

    Works on the local folder (a heavy computation, not a request to the server); the server lists the result.
    """
    from locopilot.training import lora

    with local_work():
        entry = lora.merge_model(catalog(), named(adapter), name and named(name), cast(lora.MergeType, out_type))
    console.print(f"merged {adapter} into {entry.name} ({human_size(entry.size_bytes)})", highlight=False)


@models.command("verify")
@click.argument("name", required=False)
@server_options
def verify_models(name: str | None, server: Choice) -> None:
    """Hash model files again and compare with the sha256 recorded when they arrived.

    Exits 1 if a file changed or is missing.
    """
    with connected(server) as client:
        if client is not None:
            names = [named(name)] if name else [card.id for card in decoded(client.get(MODELS), ModelList).data]
            results: list[Verification] = [
                decoded(client.post(f"{MODELS}/{one}/verify"), Verification) for one in names
            ]
        else:
            models_catalog = catalog()
            with local_work(), database() as db:
                names = [name] if name else [entry.name for entry in models_catalog.list()]
                results = [arrivals.verify(models_catalog, db, one) for one in names]
    table = Table("name", "state", "sha256", box=None)
    for result in results:
        match result.state:
            case "ok":
                state = Text("ok", style="green")
            case "recorded":
                state = Text("not recorded; recorded now", style="yellow")
            case "changed":
                state = Text(f"CHANGED (recorded {(result.recorded or '')[:12]}…)", style="bold red")
            case _:
                state = Text("missing", style="red")
        table.add_row(result.id, state, Text(result.sha256 or result.error or ""))
    console.print(table)
    if any(result.state in ("changed", "missing") for result in results):
        raise SystemExit(1)


@models.command("rm")
@click.argument("name")
@server_options
def remove_model(name: str, server: Choice) -> None:
    """Remove a model from the models folder (a link is removed, not its target); the server unloads it first."""
    with connected(server) as client:
        if client is not None:
            checked(client.delete(f"{MODELS}/{named(name)}"))
        else:
            models_catalog = catalog()
            with local_work():
                models_catalog.remove(name)
            with database() as db:
                records.delete(db, name)
    console.print(f"removed {name}", highlight=False)


@models.command("load")
@click.argument("name")
@server_options
def load_model(name: str, server: Choice) -> None:
    """Load a model into a runner of the server now (it counts towards LOCOPILOT_MAX_LOADED_MODELS)."""
    with connected(server, needed_for="loading a model") as client:
        assert client is not None
        checked(client.post(f"{MODELS}/{named(name)}/load"))
    console.print(f"loaded {name}", highlight=False)


@models.command("unload")
@click.argument("name")
@server_options
def unload_model(name: str, server: Choice) -> None:
    """Unload a model from the server: its runner ends and gives its memory back."""
    with connected(server, needed_for="unloading a model") as client:
        assert client is not None
        checked(client.post(f"{MODELS}/{named(name)}/unload"))
    console.print(f"unloaded {name}", highlight=False)


@models.command("show")
@click.argument("name")
@server_options
def show_model(name: str, server: Choice) -> None:
    """Show a model's facts: its header's, where it came from, its sha256, whether it is loaded."""
    table = Table("field", "value", box=None)
    with connected(server) as client:
        if client is not None:
            card: ModelCard = decoded(client.get(f"{MODELS}/{named(name)}"), ModelCard)
            _card_rows(table, card)
            table.add_row("loaded", "yes" if card.loaded else "no")
        else:
            _local_rows(table, name)
    console.print(table)


def _card_rows(table: Table, card: ModelCard) -> None:
    table.add_row("name", card.id)
    table.add_row("size", human_size(card.size_bytes or 0))
    table.add_row("architecture", str(card.architecture))
    table.add_row("quantization", str(card.quantization))
    table.add_row("parameters", "?" if card.parameter_count is None else f"{card.parameter_count:,}")
    table.add_row("context length", str(card.context_length))
    table.add_row("chat template", card.chat_template)
    table.add_row("tools", card.tools)
    table.add_row("source", Text(card.source or "-"))
    table.add_row("sha256", card.sha256 or "-")
    if card.error:
        table.add_row("error", Text(card.error, style="red"))


def _local_rows(table: Table, name: str) -> None:
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
    with database() as db:
        record = records.get(db, name)
    table.add_row("name", entry.name)
    table.add_row("path", Text(entry.path))
    table.add_row("size", human_size(entry.size_bytes))
    table.add_row("architecture", str(entry.architecture))
    table.add_row("quantization", str(entry.quantization))
    table.add_row("parameters", "?" if entry.parameter_count is None else f"{entry.parameter_count:,}")
    table.add_row("context length", str(entry.context_length))
    table.add_row("chat template", entry.chat_template)
    table.add_row("tools", entry.tools)
    table.add_row("source", Text(record.source if record else "-"))
    table.add_row("sha256", (record.sha256 if record else None) or "-")
    for key, value in sorted(header.metadata.items()):
        if key == "tokenizer.chat_template":
            continue
        table.add_row(Text(key), Text(_short(value)))


def _short(value: object, limit: int = 100) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
