"""``locopilot jobs``: the training jobs of a running server, over its HTTP API.

The server and key are found as for every command that talks to a server
(:func:`locopilot.cli.remote.find_server`): ``--url`` or LOCOPILOT_HOST and LOCOPILOT_PORT; the
key in ``--key-file``, else the bootstrap admin key. Answers are the server's own Structs
(:mod:`locopilot.schemas.training`), read through :mod:`locopilot.client`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import httpx
import rich_click as click
from click.core import ParameterSource
from rich.table import Table
from rich.text import Text

from locopilot.cli import console, print_error
from locopilot.cli.options import struct_options
from locopilot.cli.remote import answer, checked, located, open_client
from locopilot.client import events, job_log_event
from locopilot.errors import LocopilotError
from locopilot.schemas.training import FileObject, JobInfo, JobList, LogEvent
from locopilot.training.hyperparameters import Framework, Hyperparameters

JOBS_PATH = "/v1/locopilot/training/jobs"
STATUS_STYLES = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "dim"}

url_option = click.option("--url", help="Server address (default: from LOCOPILOT_HOST and LOCOPILOT_PORT).")
key_option = click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding an API key with the training scope (default: the bootstrap admin key, if set).",
)


@contextmanager
def server_client(url: str | None, key_file: Path | None) -> Iterator[httpx.Client]:
    """The server's client; a lost or refused connection, or an error event, ends the command with status 1."""
    server = located(url, key_file)
    try:
        with open_client(server) as client:
            yield client
    except httpx.TransportError as exc:
        print_error(f"cannot reach the server ({exc}); is `locopilot serve` running?")
        raise SystemExit(1) from exc
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc


def when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


@click.group("jobs")
def jobs() -> None:
    """Training jobs on a running server: list, show, follow, cancel."""


@jobs.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@url_option
@key_option
def list_command(limit: int, url: str | None, key_file: Path | None) -> None:
    """The newest jobs."""
    with server_client(url, key_file) as client:
        listed = answer(client.get(JOBS_PATH, params={"limit": limit}), JobList)
    table = Table("id", "status", "base model", "progress", "fine-tuned model", "created", box=None)
    for job in listed.data:
        table.add_row(
            job.id,
            status_text(job.status),
            job.model,
            f"{job.progress * 100:.0f}%",
            job.fine_tuned_model or "-",
            when(job.created_at),
        )
    console.print(table)


@jobs.command("show")
@click.argument("job_id")
@url_option
@key_option
def show_command(job_id: str, url: str | None, key_file: Path | None) -> None:
    """One job: its lineage, hyperparameters and result."""
    with server_client(url, key_file) as client:
        job = answer(client.get(f"{JOBS_PATH}/{job_id}"), JobInfo)
    table = Table("field", "value", box=None, show_header=False)
    table.add_row("id", job.id)
    table.add_row("status", status_text(job.status))
    table.add_row("base model", f"{job.model} (sha256 {job.base_sha256 or '-'})")
    table.add_row("training file", f"{job.training_file} (sha256 {job.dataset_sha256})")
    table.add_row("hyperparameters", json.dumps(job.hyperparameters | {"seed": job.seed}))
    table.add_row("progress", f"{job.progress * 100:.0f}%")
    if job.fine_tuned_model:
        table.add_row("fine-tuned model", f"{job.fine_tuned_model} (sha256 {job.output_sha256})")
    if job.hf_base:
        table.add_row("trained by", f"{job.framework}, on {job.hf_base}")
    if job.result and "adapted_tensors" in job.result:  # a framework's
        result = job.result
        table.add_row(
            "result",
            f"{job.framework} finished in {result['seconds']:.0f} s; a LoRA adapter of rank {result['lora_rank']} "
            f"on {result['adapted_tensors']} tensors",
        )
    elif job.result:
        result = job.result
        table.add_row(
            "result",
            f"loss {result['train_loss_before']:.3f} → {result['train_loss_after']:.3f}, "
            f"{result['tokens_per_s']:.0f} tokens/s, {result['trained_tokens']} tokens, "
            f"peak memory {result['peak_rss_bytes'] / 1e9:.2f} GB, {result['seconds']:.0f} s",
        )
    if job.error:
        table.add_row("error", Text(f"{job.error.code}: {job.error.message}", style="red"))
    for name, at in (("created", job.created_at), ("started", job.started_at), ("finished", job.finished_at)):
        table.add_row(name, when(at))
    console.print(table)


@jobs.command("logs")
@click.argument("job_id")
@url_option
@key_option
def logs_command(job_id: str, url: str | None, key_file: Path | None) -> None:
    """Follow a job's events (progress, loss, tokens/s, ETA) until it ends; exits 1 unless it succeeded."""
    if follow_job(job_id, url, key_file) != "succeeded":
        raise SystemExit(1)


def follow_job(job_id: str, url: str | None, key_file: Path | None) -> str | None:
    """Print the job's log stream to its end; the job's final status (None if the stream broke off)."""
    status = None
    with server_client(url, key_file) as client, client.stream("GET", f"{JOBS_PATH}/{job_id}/logs") as response:
        if response.status_code >= 400:
            checked(response)
        for name, data in events(response):
            match job_log_event(name, data):
                case ("message" | "metrics") as kind, LogEvent() as event:
                    show_event(kind, event)
                case "end", JobInfo() as job:
                    console.print(Text.assemble("job ", job.id, " ", status_text(job.status)))
                    status = job.status
    return status


def show_event(kind: str, event: LogEvent) -> None:
    """Print one log event."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.created_at or time.time()))
    if kind == "metrics" and event.data is not None:
        metrics = event.data
        eta = metrics.get("eta_s")
        console.print(
            f"{stamp} step {metrics['step']}/{metrics['total_steps']} ({metrics['progress'] * 100:.0f}%)  "
            f"loss {metrics['train_loss']:.4f}  {metrics['tokens_per_s']:.0f} tokens/s  "
            f"ETA {'-' if eta is None else f'{eta:.0f} s'}",
            highlight=False,
        )
    else:
        console.print(Text(f"{stamp} {event.message}", style="red" if event.level == "error" else ""))


@jobs.command("cancel")
@click.argument("job_id")
@url_option
@key_option
def cancel_command(job_id: str, url: str | None, key_file: Path | None) -> None:
    """Cancel a queued or running job."""
    with server_client(url, key_file) as client:
        job = answer(client.post(f"{JOBS_PATH}/{job_id}/cancel"), JobInfo)
    console.print(Text.assemble("job ", job.id, " ", status_text(job.status)))


@jobs.command("submit")
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", "base", required=True, help="Base model: a model on the server.")
@struct_options(Hyperparameters, aliases={"learning_rate": ("--lr",)})
@click.option("--remote", help="Run it on this upstream of the server (another locopilot in LOCOPILOT_UPSTREAMS).")
@click.option(
    "--framework",
    type=click.Choice(get_args(Framework)),
    default="builtin",
    show_default=True,
    help="An external framework in the server's LOCOPILOT_TRAINING_PYTHON trains a LoRA adapter of --hf-base.",
)
@click.option("--hf-base", help="With --framework: the base in Hugging Face form, a folder on the server.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Follow the job's log until it ends.")
@url_option
@key_option
@click.pass_context
def submit_command(
    ctx: click.Context,
    /,
    dataset: Path,
    base: str,
    remote: str | None,
    framework: str,
    hf_base: str | None,
    follow: bool,
    url: str | None,
    key_file: Path | None,
    **hyperparameters: Any,
) -> None:
    """Upload DATASET to the server and queue a training job of BASE on it (the flags not given:
    the server's defaults, shown here; auto: chosen when the job starts)."""
    body: dict[str, Any] = {"model": base}
    for name, value in hyperparameters.items():
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            body[name] = value
    if remote is not None:
        body["remote"] = remote
    if framework != "builtin":
        body["framework"] = framework
    if hf_base is not None:
        body["hf_base"] = hf_base
    submit(dataset, body, url=url, key_file=key_file, follow=follow)


def submit(dataset: Path, job: dict[str, Any], *, url: str | None, key_file: Path | None, follow: bool) -> None:
    """Upload ``dataset``, create the job ``job`` (the JSON body, less its training file) and,
    with ``follow``, print its log to the end. Exits 1 on an error answer, or when a followed
    job does not succeed."""
    with server_client(url, key_file) as client:
        with dataset.open("rb") as f:
            upload = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (dataset.name, f)})
        uploaded = answer(upload, FileObject)
        created = answer(client.post(JOBS_PATH, json=job | {"training_file": uploaded.id}), JobInfo)
    console.print(Text.assemble("job ", created.id, " ", status_text(created.status)))
    if follow and follow_job(created.id, url, key_file) != "succeeded":
        raise SystemExit(1)
