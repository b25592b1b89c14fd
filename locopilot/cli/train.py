"""``locopilot train``: check a dataset; fine-tune a GGUF with llama.cpp, or hand the job to an external framework."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

import msgspec
import rich_click as click
from click.core import ParameterSource
from rich.table import Table
from rich.text import Text

from locopilot.cli import console, print_error, settings_or_exit
from locopilot.cli.jobs import key_option, submit, url_option
from locopilot.cli.options import struct_options
from locopilot.errors import LocopilotError
from locopilot.models.catalog import ModelCatalog
from locopilot.training import jobfile
from locopilot.training.hyperparameters import (
    BUILTIN_ONLY,
    DEFAULT_CONTEXT,
    DEFAULT_LORA_LEARNING_RATE,
    DEFAULT_LORA_RANK,
    FIELDS,
    GATE_THRESHOLDS,
    builtin_only,
    lora_values,
)
from locopilot.training.spotcheck import SpotCheck
from locopilot.training.trainer import Finished, TrainConfig


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


#: Where a flag differs between the built-in trainer and an external framework.
NOTES = {
    "epochs": "auto: builtin, from the dataset's size; LoRA, 1.",
    "learning_rate": f"auto: builtin, from the model's size; LoRA, {DEFAULT_LORA_LEARNING_RATE:g}.",
    "layers": "auto: builtin, from the model's size; LoRA, 0.",
    "lora_rank": f"builtin: a base in the models folder; auto, from its size. LoRA: default {DEFAULT_LORA_RANK}.",
    **dict.fromkeys(BUILTIN_ONLY, "Built-in trainer only."),
}
#: The gate's thresholds that read the spot check's answers.
SPOT_CHECK_THRESHOLDS = ("min_recall", "max_spot_check_lost")


@click.group(invoke_without_command=True)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A TOML or JSON file with these options (keys with _ for -); flags given here override it.",
)
@struct_options(
    jobfile.TrainOptions,
    only=("base", "hf_base", "dataset", "framework", *FIELDS, "spot_check", "python"),
    aliases={"learning_rate": ("--lr",)},
    notes=NOTES,
)
@click.option(
    "--dry-run", is_flag=True, help="External frameworks: write the config and print the command, run nothing."
)
@click.option(
    "--server",
    "on_server",
    is_flag=True,
    help="Run the job on the running server (its queue, models and logs) instead of in this process.",
)
@click.option(
    "--remote",
    help="Run the job on this upstream of the running server (another locopilot in LOCOPILOT_UPSTREAMS).",
)
@click.option(
    "--follow/--no-follow", default=True, show_default=True, help="With --server or --remote: follow the job's log."
)
@url_option
@key_option
@click.pass_context
def train(
    ctx: click.Context,
    /,
    config_file: Path | None,
    dry_run: bool,
    on_server: bool,
    remote: str | None,
    follow: bool,
    url: str | None,
    key_file: Path | None,
    **flags: Any,
) -> None:
    """Fine-tune a model on a JSONL dataset.

    The built-in trainer fine-tunes a GGUF with llama.cpp (no PyTorch); the result is added
    to the models folder as BASE-ft-ID and can be served at once. `--framework unsloth|axolotl|mlx`
    hands the job to that framework instead (installed separately; see `locopilot doctor`).
    `--server` sends the job to the running server (BASE is a model there), `--remote NAME`
    through it to another locopilot; both then follow its log, as `locopilot jobs logs` does.
    With a framework there, `--hf-base FOLDER` names the base in Hugging Face form on that server,
    which the framework trains; its adapter is converted and served beside BASE as BASE-ft-ID.
    `locopilot train validate FILE` checks a dataset without training.
    """
    if ctx.invoked_subcommand is not None:
        return
    given = {
        name: value
        for name, value in flags.items()
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    }
    try:
        options = jobfile.merge(jobfile.load(config_file) if config_file else jobfile.TrainOptions(), given)
    except jobfile.JobFileInvalid as exc:
        print_error(str(exc))
        raise SystemExit(2) from exc
    if options.base is None or options.dataset is None:
        raise click.UsageError("give --base MODEL and --dataset FILE (or a subcommand)")
    dataset = Path(options.dataset)
    if not dataset.is_file():
        print_error(f"the dataset {dataset} is not a file")
        raise SystemExit(2)
    if not options.builtin and (refused := builtin_only(options)):
        raise click.UsageError(
            f"{as_flags(refused)}: built-in trainer only; --framework {options.framework} has no such setting"
        )
    if on_server or remote is not None:
        if dry_run:
            raise click.UsageError("--dry-run is for a framework run here, not with --server or --remote")
        if not options.builtin and options.hf_base is None:
            raise click.UsageError(
                f"--framework {options.framework} with --server or --remote trains the base in Hugging Face form: "
                "give --hf-base FOLDER (a folder on the server) beside --base (its GGUF there)"
            )
        submit(dataset, server_job(options, options.base, remote), url=url, key_file=key_file, follow=follow)
    elif options.hf_base is not None:
        raise click.UsageError(
            "--hf-base names the Hugging Face folder on the server, with --server or --remote; "
            "here --base names the model the framework trains"
        )
    elif options.framework == "builtin":
        _train_builtin(options, options.base, dataset)
    else:
        _train_external(options, options.base, dataset, dry_run=dry_run)


def as_flags(names: list[str]) -> str:
    """Option names as their flags: ``--min-recall, --loss``."""
    return ", ".join(f"--{name.replace('_', '-')}" for name in names)


def server_job(options: jobfile.TrainOptions, base: str, remote: str | None) -> dict[str, Any]:
    """The body of ``POST /v1/locopilot/training/jobs`` for these options (the server runs its
    spot check always). A ``--hf-base`` that is a folder here is sent as its absolute path (the
    server is usually this machine); anything else as given, for the server to judge."""
    job: dict[str, Any] = {"model": base, **msgspec.structs.asdict(options.hyperparameters())}
    if not options.builtin:
        assert options.hf_base is not None  # checked by the command
        folder = Path(options.hf_base).expanduser()
        job |= {
            "framework": options.framework,
            "hf_base": str(folder.resolve()) if folder.is_dir() else options.hf_base,
        }
    return job if remote is None else job | {"remote": remote}


def _train_builtin(options: jobfile.TrainOptions, base: str, dataset: Path) -> None:
    settings = settings_or_exit()
    base_path = base_model_path(base)
    if options.lora_rank is not None and base.endswith(".gguf"):
        # The adapter names its base, which the server finds in its models folder.
        raise click.UsageError(
            "--lora-rank with the built-in trainer needs --base to name a model in the models folder"
        )
    thresholds = {name: getattr(options, name) for name in GATE_THRESHOLDS if getattr(options, name) is not None}
    if not options.spot_check and (needing := [n for n in SPOT_CHECK_THRESHOLDS if n in thresholds]):
        raise click.UsageError(f"{as_flags(needing)} read the spot check's answers: drop --no-spot-check")
    name = f"{base_path.stem if base.endswith('.gguf') else base}-ft-{secrets.token_hex(4)}"
    # The job's own folder: its F32 copies are removed even when the worker was killed.
    work_dir = settings.data_path / "training" / name
    work_dir.mkdir(parents=True, exist_ok=True)
    output = ModelCatalog(settings.models_path).path_for(name)
    output.parent.mkdir(parents=True, exist_ok=True)
    # With a gate, the result waits in the held folder (as a server job's does) until it passes.
    held = settings.data_path / "training" / "held" / output.name
    if thresholds:
        held.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = TrainConfig(
        **msgspec.structs.asdict(options.hyperparameters()),
        base_path=str(base_path.resolve()),
        dataset_path=str(dataset.resolve()),
        output_path=str(held if thresholds else output),
        work_dir=str(work_dir),
        threads=settings.threads,
        spot_check=options.spot_check,
        base_name=base,
    )
    log_path = settings.data_path / "training" / f"{name}.log"
    try:
        finished = _run_with_progress(config, log_path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    summary = (
        f"trained {name}: loss {finished.train_loss_before:.3f} → {finished.train_loss_after:.3f}"
        if finished.validation_loss_before is None or finished.validation_loss_after is None
        else f"trained {name}: loss {finished.train_loss_before:.3f} → {finished.train_loss_after:.3f}, "
        f"held-out {finished.validation_loss_before:.3f} → {finished.validation_loss_after:.3f}"
    )
    console.print(
        f"{summary}, {finished.tokens_per_s:.0f} tokens/s, peak memory {finished.peak_rss_bytes / 1e9:.2f} GB, "
        f"{finished.seconds:.0f} s",
        highlight=False,
    )
    if finished.spot_check is not None:
        _print_spot_check(finished.spot_check)
    if thresholds:
        from locopilot.training.publishing import gate, move_into

        if reasons := gate(thresholds, finished):
            print_error(
                "held back by the eval gate, not published as a model: "
                + "; ".join(reasons)
                + f". The result is kept at {held}"
            )
            raise SystemExit(1)
        move_into(held, output)
        console.print(f"the eval gate passed; {name} is in the models folder", highlight=False)


def _print_spot_check(check: SpotCheck) -> None:
    table = Table("question", "base", "trained", box=None, title="general-knowledge spot check", title_justify="left")
    for answer in check.answers:
        mark = "" if answer.changed else " (same)"
        table.add_row(
            Text(answer.question),
            Text(("✓ " if answer.base_correct else "✗ ") + answer.base_answer[:60]),
            Text(("✓ " if answer.trained_correct else "✗ ") + answer.trained_answer[:60] + mark),
        )
    console.print(table)
    console.print(
        f"right before {check.base_correct}/{len(check.answers)}, after {check.trained_correct}/{len(check.answers)}; "
        f"{check.changed} answers changed, {check.lost} lost",
        highlight=False,
    )


def _train_external(options: jobfile.TrainOptions, base: str, dataset: Path, *, dry_run: bool) -> None:
    from locopilot.training.adapters.base import FrameworkFailed, run
    from locopilot.training.datasets import DatasetInvalid
    from locopilot.training.external import check_installed, find_python, plan_job

    settings = settings_or_exit()
    framework = options.framework
    try:
        python = find_python(options.python, settings.training_python)
        if not dry_run:
            check_installed(framework, python, "see `locopilot doctor`, or give --python")
        name = f"{Path(base).name or 'model'}-{framework}-{secrets.token_hex(4)}"
        output_dir = settings.data_path / "training" / name
        work_dir = output_dir / "work"
        plan, data = plan_job(
            framework,
            base=base,
            dataset=dataset,
            output_dir=output_dir,
            work_dir=work_dir,
            python=python,
            **lora_values(options)._asdict(),
            optimizer=options.optimizer,
            context=options.context,
            seed=options.seed,
            validation_split=options.validation_split,
        )
        for file_name in plan.files:
            (work_dir / file_name).write_text(plan.files[file_name], encoding="utf-8")
        console.print(
            f"{framework}: {data.train_examples} training and {data.valid_examples} held-out examples in {work_dir}",
            highlight=False,
        )
        console.print(Text(" ".join(plan.argv)))
        if dry_run:
            return
        log_path = output_dir / f"{framework}.log"
        with log_path.open("wb") as log:
            console.print(f"running; its output goes to {log_path}", highlight=False)
            run(plan, work_dir, log)
    except DatasetInvalid as exc:
        print_error(f"{dataset} cannot be trained on:\n{exc}")
        raise SystemExit(1) from exc
    except FrameworkFailed as exc:
        print_error(str(exc))
        raise SystemExit(1) from exc
    console.print(
        f"trained a LoRA adapter in {plan.adapter_dir}. To serve it beside a GGUF of the same base: "
        f"locopilot models adapter {plan.adapter_dir} --base MODEL --name NAME",
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
                    chosen = f" ({', '.join(event.chosen)} auto)" if event.chosen else ""
                    console.print(
                        f"{event.epochs} epochs, learning rate {event.learning_rate:.2g}, "
                        f"{f'the last {event.layers}' if event.layers else 'all'} layers{chosen}: {steps} steps",
                        highlight=False,
                    )
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
    from locopilot.engine.templates import TemplateError
    from locopilot.training.datasets import DatasetInvalid, validate
    from locopilot.training.tokenizer import ChatTokenizer

    try:
        tokenizer = ChatTokenizer(base_model_path(base)) if base else None
    except TemplateError as exc:
        print_error(f"the chat template of {base} fails: {exc}")
        raise SystemExit(1) from exc
    try:
        summary = validate(dataset, tokenizer, context if tokenizer else None)
    except TemplateError as exc:
        print_error(f"the chat template of {base} fails: {exc}")
        raise SystemExit(1) from exc
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
