"""``locopilot train``: check a fine-tuning dataset, fine-tune a GGUF with llama.cpp's trainer."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import rich_click as click
from rich.table import Table

from locopilot.cli import console, print_error, settings_or_exit
from locopilot.errors import LocopilotError
from locopilot.models.catalog import ModelCatalog
from locopilot.training.trainer import (
    DEFAULT_CONTEXT,
    DEFAULT_LAYERS,
    DEFAULT_LEARNING_RATE,
    OUTPUT_TYPES,
    Finished,
    TrainConfig,
)


def base_model_path(model: str) -> Path:
    """``model`` as a path to a GGUF file, or else a name in the models folder; exits 1 if neither."""
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return path
    try:
        return Path(ModelCatalog(settings_or_exit().models_path).get(model).path)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc


@click.group(invoke_without_command=True)
@click.option("--base", "base", help="Base model: a name in the models folder or a .gguf path.")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL dataset.")
@click.option("--epochs", type=click.IntRange(1, 100), default=1, show_default=True)
@click.option("--learning-rate", "--lr", type=float, default=DEFAULT_LEARNING_RATE, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option(
    "--layers",
    type=click.IntRange(min=0),
    default=DEFAULT_LAYERS,
    show_default=True,
    help="Train the last N blocks; 0: all.",
)
@click.option("--context", type=click.IntRange(min=256), default=DEFAULT_CONTEXT, show_default=True)
@click.option("--output-type", type=click.Choice(sorted(OUTPUT_TYPES)), default="q8_0", show_default=True)
@click.pass_context
def train(
    ctx: click.Context,
    base: str | None,
    dataset: Path | None,
    epochs: int,
    learning_rate: float,
    optimizer: str,
    layers: int,
    context: int,
    output_type: str,
) -> None:
    """Fine-tune a GGUF model on a JSONL dataset (llama.cpp's built-in trainer, no PyTorch).

    The result is added to the models folder as BASE-ft-ID and can be served at once.
    `locopilot train validate FILE` checks a dataset without training.
    """
    if ctx.invoked_subcommand is not None:
        return
    if base is None or dataset is None:
        raise click.UsageError("give --base MODEL and --dataset FILE (or a subcommand)")
    settings = settings_or_exit()
    base_path = base_model_path(base)
    name = f"{base_path.stem if base.endswith('.gguf') else base}-ft-{secrets.token_hex(4)}"
    # The job's own folder: its F32 copies are removed even when the worker was killed.
    work_dir = settings.data_path / "training" / name
    work_dir.mkdir(parents=True, exist_ok=True)
    output = ModelCatalog(settings.models_path).path_for(name)
    output.parent.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        base_path=str(base_path.resolve()),
        dataset_path=str(dataset.resolve()),
        output_path=str(output),
        work_dir=str(work_dir),
        epochs=epochs,
        learning_rate=learning_rate,
        optimizer="sgd" if optimizer == "sgd" else "adamw",
        layers=layers,
        context=context,
        output_type=output_type,
        threads=settings.threads,
    )
    log_path = settings.data_path / "training" / f"{name}.log"
    try:
        finished = _run_with_progress(config, log_path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    console.print(
        f"trained {name}: loss {finished.train_loss_before:.3f} → {finished.train_loss_after:.3f}, "
        f"{finished.tokens_per_s:.0f} tokens/s, peak memory {finished.peak_rss_bytes / 1e9:.2f} GB, "
        f"{finished.seconds:.0f} s",
        highlight=False,
    )


def _run_with_progress(config: TrainConfig, log_path: Path) -> Finished:
    """Run the worker with a progress bar; Ctrl-C cancels between chunks. Exits 1 on failure."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from locopilot.training import trainer
    from locopilot.training.worker import Cancelled, Failed, TrainingWorker

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} windows"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tokens/s"),
        TimeRemainingColumn(),
    )
    with log_path.open("wb") as log, TrainingWorker(config, stderr=log) as worker, Progress(*columns) as bar:
        task = bar.add_task("preparing", total=None, loss="-", speed="-")
        last = None
        events = worker.events()
        while True:
            try:
                event = next(events, None)
            except KeyboardInterrupt:
                bar.update(task, description="cancelling")
                worker.cancel()
                continue
            if event is None:
                break
            last = event
            match event:
                case trainer.Started(steps=steps):
                    bar.update(task, description="training", total=steps)
                case trainer.Progress(step=step, loss=loss, tokens_per_s=speed, epoch=epoch):
                    bar.update(
                        task, completed=step, loss=f"{loss:.3f}", speed=f"{speed:.0f}", description=f"epoch {epoch}"
                    )
    match last:
        case trainer.Finished():
            return last
        case Failed(error=error):
            print_error(error)
        case Cancelled():
            print_error("cancelled; nothing was written")
        case _:
            print_error(f"the training worker stopped without a result; its log is {log_path}")
    raise SystemExit(1)


@train.command("validate")
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", "base", help="Base model (name or .gguf path): count tokens with its chat template.")
@click.option(
    "--context",
    type=click.IntRange(min=16),
    default=DEFAULT_CONTEXT,
    show_default=True,
    help="Training context in tokens.",
)
def validate_command(dataset: Path, base: str | None, context: int) -> None:
    """Check a JSONL dataset (Alpaca, ShareGPT or OpenAI chat), every line, and summarize it."""
    from locopilot.training.datasets import DatasetInvalid, validate
    from locopilot.training.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer(base_model_path(base)) if base else None
    try:
        summary = validate(dataset, tokenizer, context if tokenizer else None)
    except DatasetInvalid as exc:
        print_error(f"{dataset} cannot be trained on:\n{exc}")
        raise SystemExit(1) from exc
    except OSError as exc:
        print_error(f"cannot read {dataset}: {exc.strerror or exc}")
        raise SystemExit(1) from exc
    finally:
        if tokenizer is not None:
            tokenizer.close()
    table = Table("field", "value", box=None)
    table.add_row("format", summary.format)
    table.add_row("examples", str(summary.examples))
    if summary.tokens is None:
        table.add_row("tokens", "not counted (give --base MODEL)")
    else:
        table.add_row("tokens", f"{summary.tokens:,} (with the chat template of {base})")
        table.add_row("longest", f"{summary.longest_tokens:,} tokens (line {summary.longest_line})")
        table.add_row("context", f"{summary.context:,}")
    console.print(table)
