"""``locopilot pull``: download a model, with progress bars; through the running server when one answers.

With a server, the pull is ``POST /v1/locopilot/models/pull`` and its progress the SSE events it
streams (read with :mod:`locopilot.client`, the one client of a locopilot server); without one, the same
:class:`~locopilot.models.pull.Puller` runs here, on the local models folder.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import msgspec
import rich_click as click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from locopilot.cli import console, database, print_error, settings_or_exit
from locopilot.cli.models import human_size
from locopilot.cli.remote import Choice, checked, connected, server_options
from locopilot.client import events, stream_error
from locopilot.errors import LocopilotError
from locopilot.models.catalog import ModelCatalog
from locopilot.models.pull import Puller, PullEvent, PullRequest, prepare
from locopilot.schemas.openai import ModelCard, model_card
from locopilot.settings import Settings
from locopilot.store.db import Database

_event = msgspec.json.Decoder(PullEvent)
_card = msgspec.json.Decoder(ModelCard)


class Bars:
    """The progress of one pull on the terminal: a line per status, a bar per file."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bars: dict[str, TaskID] = {}

    def show(self, event: PullEvent) -> None:
        if event.digest is None:
            self.progress.console.print(event.status, highlight=False)
            return
        task = self.bars.get(event.digest)
        if task is None:
            task = self.bars[event.digest] = self.progress.add_task(event.file or event.digest, total=event.total)
        self.progress.update(task, completed=event.completed or 0, total=event.total)


def progress_bars() -> Progress:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=False)


@click.command()
@click.argument("ref")
@click.option("--name", help="Local model name (default: taken from REF).")
@click.option("--sha256", help="The file's SHA-256, required for a URL: the download must match it.")
@click.option("--insecure-no-checksum", is_flag=True, help="Take a URL's file without a --sha256 pin.")
@click.option("--insecure", is_flag=True, help="Allow a plain-http Ollama registry (http://HOST/NS/MODEL:TAG).")
@server_options
def pull(
    ref: str, name: str | None, sha256: str | None, insecure_no_checksum: bool, insecure: bool, server: Choice
) -> None:
    """Download a model: hf.co/OWNER/REPO[:QUANT], hf.co/OWNER/REPO/FILE.gguf, an Ollama name
    (llama3.2:1b, NAMESPACE/MODEL:TAG, HOST/NAMESPACE/MODEL:TAG) or an https URL of a .gguf.

    Downloads resume where they stopped, are checked against the SHA-256 their source
    publishes, and appear in the models folder only once verified. The running server
    downloads (into its models folder) when one answers; otherwise this command does. Ctrl-C
    stops; pull again to resume.
    """
    try:
        request = prepare(ref, name=name, sha256=sha256, insecure=insecure, no_checksum=insecure_no_checksum)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(2) from exc
    try:
        with connected(server) as client:
            if client is not None:
                body = {
                    "model": ref,
                    "name": name,
                    "sha256": sha256,
                    "insecure": insecure,
                    "insecure_no_checksum": insecure_no_checksum,
                }
                card = _pull_remote(client, body)
            else:
                settings = settings_or_exit()
                with database() as db:
                    card = anyio.run(_pull_local, settings, db, request)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc
    except KeyboardInterrupt:
        print_error("cancelled; pull again to resume the download")
        raise SystemExit(130) from None
    console.print(
        f"pulled {card.id} ({human_size(card.size_bytes or 0)}, {card.quantization}) from {request.ref}",
        highlight=False,
    )


def _pull_remote(client: httpx.Client, body: dict[str, Any]) -> ModelCard:
    """Ask the server to pull, showing its progress events; the model card it ends with."""
    card = None
    with client.stream("POST", "/v1/locopilot/models/pull", json=body) as response, progress_bars() as progress:
        if response.status_code >= 400:
            checked(response)
        bars = Bars(progress)
        for event, data in events(response):
            match event:
                case "progress":
                    bars.show(_event.decode(data))
                case "model":
                    card = _card.decode(data)
                case "error":
                    raise stream_error(data)
    if card is None:
        raise LocopilotError("the server ended the pull without the model; pull again to resume")
    return card


async def _pull_local(settings: Settings, db: Database, request: PullRequest) -> ModelCard:
    catalog = ModelCatalog(settings.models_path)
    async with anyio.create_task_group() as tasks:
        puller = Puller(settings, catalog, db, tasks)
        with progress_bars() as progress:
            bars = Bars(progress)
            async for event in puller.pull(request):
                bars.show(event)
    return model_card(catalog.get(request.name), loaded=False)
