"""``locopilot pull``: download a model into the models folder, with progress bars."""

from __future__ import annotations

import anyio
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
from locopilot.errors import LocopilotError
from locopilot.models.catalog import ModelCatalog
from locopilot.models.pull import Puller, PullRequest, prepare
from locopilot.settings import Settings
from locopilot.store.db import Database


@click.command()
@click.argument("ref")
@click.option("--name", help="Local model name (default: taken from REF).")
@click.option("--sha256", help="The file's SHA-256, required for a URL: the download must match it.")
@click.option("--insecure-no-checksum", is_flag=True, help="Take a URL's file without a --sha256 pin.")
@click.option("--insecure", is_flag=True, help="Allow a plain-http Ollama registry (http://HOST/NS/MODEL:TAG).")
def pull(ref: str, name: str | None, sha256: str | None, insecure_no_checksum: bool, insecure: bool) -> None:
    """Download a model: hf.co/OWNER/REPO[:QUANT], hf.co/OWNER/REPO/FILE.gguf, an Ollama name
    (llama3.2:1b, NAMESPACE/MODEL:TAG, HOST/NAMESPACE/MODEL:TAG) or an https URL of a .gguf.

    Downloads resume where they stopped, are checked against the SHA-256 their source
    publishes, and appear in the models folder only once verified. Ctrl-C stops; pull
    again to resume.
    """
    settings = settings_or_exit()
    try:
        request = prepare(ref, name=name, sha256=sha256, insecure=insecure, no_checksum=insecure_no_checksum)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(2) from exc
    with database() as db:
        try:
            anyio.run(_pull, settings, db, request)
        except LocopilotError as exc:
            print_error(exc.message)
            raise SystemExit(1) from exc
        except KeyboardInterrupt:
            print_error("cancelled; pull again to resume the download")
            raise SystemExit(130) from None


async def _pull(settings: Settings, db: Database, request: PullRequest) -> None:
    catalog = ModelCatalog(settings.models_path)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    bars: dict[str, TaskID] = {}
    async with anyio.create_task_group() as tasks:
        puller = Puller(settings, catalog, db, tasks)
        with Progress(*columns, console=console, transient=False) as progress:
            async for event in puller.pull(request):
                if event.digest is None:
                    progress.console.print(event.status, highlight=False)
                    continue
                task = bars.get(event.digest)
                if task is None:
                    task = bars[event.digest] = progress.add_task(event.file or event.digest, total=event.total)
                progress.update(task, completed=event.completed or 0, total=event.total)
    entry = catalog.get(request.name)
    console.print(
        f"pulled {entry.name} ({human_size(entry.size_bytes)}, {entry.quantization}) from {request.ref}",
        highlight=False,
    )
