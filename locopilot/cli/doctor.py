"""``locopilot doctor``: check that everything the server needs is in place."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import msgspec
import rich_click as click
from rich.table import Table
from rich.text import Text

from locopilot.cli import console
from locopilot.cli.remote import base_url
from locopilot.client import sync_client
from locopilot.engine.protocol import Probe, probe_decoder
from locopilot.engine.supervisor import probe_command
from locopilot.models.catalog import ModelCatalog
from locopilot.models.memory import gib
from locopilot.settings import Settings, SettingsError, load_settings
from locopilot.store.db import Database, StoreError

MIN_FREE_BYTES = 1_000_000_000


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def check_settings() -> tuple[Check, Settings | None]:
    try:
        return Check("settings", "ok", "environment is valid"), load_settings(os.environ)
    except SettingsError as exc:
        return Check("settings", "fail", str(exc)), None


def check_data_dir(settings: Settings) -> Check:
    try:
        settings.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=settings.data_path):
            pass
    except OSError as exc:
        return Check("data folder", "fail", f"{settings.data_path} is not writable: {exc.strerror}")
    return Check("data folder", "ok", f"{settings.data_path} is writable")


def check_database(settings: Settings) -> Check:
    try:
        db = Database.open(settings.db_path)
    except (StoreError, OSError) as exc:
        return Check("database", "fail", f"{settings.db_path}: {exc}")
    try:
        problem = db.health()
    finally:
        db.close()
    if problem:
        return Check("database", "fail", problem)
    return Check("database", "ok", str(settings.db_path))


def check_engine(settings: Settings) -> list[Check]:
    """llama.cpp's probe: whether it loads and which CPU library it chose, and which GPUs it found."""
    try:
        result = subprocess.run(probe_command(settings.backends_dir), capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Check("llama.cpp", "fail", str(exc))]
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        return [Check("llama.cpp", "fail", lines[-1] if lines else f"exit code {result.returncode}")]
    try:
        found = probe_decoder.decode(result.stdout)
    except msgspec.DecodeError as exc:
        return [Check("llama.cpp", "fail", f"the probe answered something unexpected: {exc}")]
    return [Check("llama.cpp", "ok", describe_probe(found)), check_gpus(found, settings)]


def check_gpus(found: Probe, settings: Settings) -> Check:
    """The GPUs with their memory, or why a GPU library that was there found none (a warning)."""
    if found.gpus:
        layers = "as many as fit" if settings.gpu_layers < 0 else str(settings.gpu_layers)
        listed = "; ".join(
            f"{g.name} {g.description}: {gib(g.memory_free)} free of {gib(g.memory_total)}" for g in found.gpus
        )
        return Check("GPU", "ok", f"{listed}; layers on them: {layers} (LOCOPILOT_GPU_LAYERS)")
    if found.gpu_note:
        return Check("GPU", "warn", f"{found.gpu_note}; the CPU does the work")
    return Check(
        "GPU", "ok", "none: no GPU library (LOCOPILOT_BACKENDS_DIR, or beside the binary); the CPU does the work"
    )


def describe_probe(found: Probe) -> str:
    """``llama-cpp-python 0.3.36; CPU variant haswell (libggml-cpu-haswell.so: AVX2 FMA ...); devices: ...``"""
    parts = [f"llama-cpp-python {found.version}"]
    if found.cpu is not None and found.cpu.library is not None:
        variant = found.cpu.variant or "single build"
        # REPACK, OPENMP and LLAMAFILE are ggml's options, not instruction sets.
        sets = [f for f in found.cpu.features if f not in {"REPACK", "OPENMP", "LLAMAFILE"}]
        parts.append(f"CPU variant {variant} ({found.cpu.library}: {' '.join(sets) or 'baseline'})")
    parts.append(f"devices: {'; '.join(found.devices)}")
    return "; ".join(parts)


def check_models(settings: Settings) -> Check:
    if not settings.models_path.is_dir():
        problem = "is not a folder" if settings.models_path.exists() else "does not exist"
        return Check("models folder", "fail", f"{settings.models_path} {problem}")
    entries = ModelCatalog(settings.models_path).list()
    broken = [e.name for e in entries if e.error]
    if not entries:
        return Check("models folder", "warn", f"{settings.models_path} has no models")
    if broken:
        return Check("models folder", "warn", f"{len(entries)} models; unreadable: {', '.join(broken)}")
    names = {e.name for e in entries}
    default = "" if settings.default_model in names else f"; default model {settings.default_model} is missing"
    return Check("models folder", "warn" if default else "ok", f"{len(entries)} models{default}")


def check_disk(settings: Settings) -> Check:
    path = settings.data_path if settings.data_path.exists() else settings.data_path.parent
    free = shutil.disk_usage(path).free
    status = "ok" if free >= MIN_FREE_BYTES else "warn"
    return Check("free disk", status, f"{free / 1e9:.1f} GB free at {path}")


def check_server(settings: Settings) -> Check:
    url = base_url(settings)
    try:
        with sync_client(url, "") as client:  # no key: /health answers anyone
            response = client.get("/health", timeout=2)
    except httpx.TransportError:
        return Check("server", "warn", f"nothing answers at {url} (start it with `locopilot serve`)")
    if response.status_code == 200:
        return Check("server", "ok", f"answering at {url}")
    return Check("server", "fail", f"{url}/health answered {response.status_code}")


def check_training_frameworks(settings: Settings) -> Check:
    """Which external training frameworks the training Python has (never a failure: the built-in trainer needs none)."""
    from locopilot.training.adapters import FRAMEWORKS, preference
    from locopilot.training.adapters.base import FrameworkFailed
    from locopilot.training.external import find_python, installed

    try:
        python = find_python(None, settings.training_python)
        found = installed(python)
    except FrameworkFailed as exc:
        return Check("training frameworks", "warn", str(exc))
    order = preference()
    names = sorted(FRAMEWORKS, key=order.index)
    preferred = next((name for name in order if name in found), None)
    parts = [
        f"{name} {found[name] or '(no version)'}" + (" (first choice here)" if name == preferred else "")
        for name in names
        if name in found
    ]
    missing = [name for name in names if name not in found]
    if missing:
        parts.append(f"not installed: {', '.join(missing)}")
    return Check("training frameworks", "ok", f"{'; '.join(parts)} (in {python}); the built-in trainer needs none")


CHECKS: list[Callable[[Settings], Check | list[Check]]] = [
    check_data_dir,
    check_database,
    check_engine,
    check_models,
    check_disk,
    check_training_frameworks,
    check_server,
]

MARKS = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}


@click.command()
def doctor() -> None:
    """Check settings, data folder, database, llama.cpp and GPUs, models, disk, training frameworks and the server.

    Exits with status 1 if any check fails.
    """
    first, settings = check_settings()
    results = [first]
    if settings is not None:
        # At once: the slow ones wait on other processes (the engine probe starts llama.cpp,
        # the frameworks check a Python, the server check a socket).
        with ThreadPoolExecutor(len(CHECKS)) as pool:
            for found in pool.map(lambda check: check(settings), CHECKS):
                results += found if isinstance(found, list) else [found]
    table = Table("check", "status", "detail", box=None)
    for result in results:
        table.add_row(result.name, MARKS[result.status], Text(result.detail))
    console.print(table, highlight=False)
    if any(r.status == "fail" for r in results):
        raise SystemExit(1)
