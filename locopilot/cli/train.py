"""``locopilot train``: check a fine-tuning dataset, fine-tune a GGUF with llama.cpp's trainer."""

from __future__ import annotations

from pathlib import Path

import rich_click as click
from rich.table import Table

from locopilot.cli import console, print_error, settings_or_exit
from locopilot.errors import LocopilotError
from locopilot.models.catalog import ModelCatalog
from locopilot.training.trainer import DEFAULT_CONTEXT


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


@click.group()
def train() -> None:
    """Fine-tune local GGUF models (llama.cpp's built-in trainer, no PyTorch)."""


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
