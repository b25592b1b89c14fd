"""Settings from the environment: defaults, refusals that name the variable, and the README table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
from msgspec import Meta

from locopilot import settings as settings_module
from locopilot.settings import (
    README_END,
    README_START,
    Settings,
    SettingsError,
    describe,
    effective_items,
    env_name,
    load_settings,
    settings_table,
    with_settings_table,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def int_ranges() -> list[tuple[str, int | None, int | None]]:
    """(field, lowest allowed, highest allowed) for every integer setting, read from the Settings type."""
    hints = get_type_hints(Settings, include_extras=True)
    ranges = []
    for name in Settings.__struct_fields__:
        base, *extras = get_args(hints[name]) or (hints[name],)
        if base is int:
            meta = next(m for m in extras if isinstance(m, Meta))
            ranges.append((name, meta.ge, meta.le))
    return ranges


INT_RANGES = int_ranges()
INT_FIELDS = [name for name, _, _ in INT_RANGES]


def out_of_range() -> list[tuple[str, str, str]]:
    """(field, value just outside its range, the bound msgspec reports) for every integer setting."""
    cases = []
    for name, low, high in INT_RANGES:
        if low is not None:
            cases.append((name, str(low - 1), f">= {low}"))
        if high is not None:
            cases.append((name, str(high + 1), f"<= {high}"))
    return cases


@pytest.fixture
def linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module.sys, "platform", "linux")


def refusal(environ: dict[str, str]) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    return caught.value


# Defaults and the data folder


def test_defaults(linux: None) -> None:
    settings = load_settings({"HOME": "/home/ada"})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.log_level == "info"
    assert settings.default_model == "smollm2-135m-instruct"
    assert settings.data_dir == "/home/ada/.local/share/locopilot"
    assert settings.models_dir == "/home/ada/.local/share/locopilot/models"
    assert settings.db_path == Path("/home/ada/.local/share/locopilot/locopilot.db")


@pytest.mark.parametrize(
    ("cores", "threads", "batch", "one_token"),
    [(2, 0, 2, 0), (16, 0, 16, 0), (8, 3, 3, 3)],
)
def test_threads_for_one_token_steps_are_measured_unless_set(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int, batch: int, one_token: int
) -> None:
    """0 for one-token steps: the runner measures every core against one fewer (engine/threads.py)."""
    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: cores)
    settings = load_settings({"HOME": "/home/ada", "LOCOPILOT_THREADS": str(threads)})
    runtime = settings.for_model("any")
    assert (runtime.threads, runtime.decode_threads) == (batch, one_token)


def test_every_default_is_allowed() -> None:
    # The struct's defaults pass through the same validation as values from the environment.
    variables = {info.variable for info in describe()}
    defaults = {
        env_name(f): str(d)
        for f, d in zip(Settings.__struct_fields__, Settings.__struct_defaults__, strict=True)
        if env_name(f) in variables
    }
    settings = load_settings(defaults | {"LOCOPILOT_DATA_DIR": "/d"})
    for name, default in zip(Settings.__struct_fields__, Settings.__struct_defaults__, strict=True):
        if name not in ("data_dir", "models_dir"):
            assert getattr(settings, name) == default


def test_xdg_data_home(linux: None) -> None:
    settings = load_settings({"HOME": "/home/ada", "XDG_DATA_HOME": "/xdg"})
    assert settings.data_dir == "/xdg/locopilot"
    assert settings.models_dir == "/xdg/locopilot/models"


def test_macos_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module.sys, "platform", "darwin")
    settings = load_settings({"HOME": "/Users/ada", "XDG_DATA_HOME": "/xdg"})
    assert settings.data_dir == "/Users/ada/Library/Application Support/locopilot"


def test_state_directory_wins(linux: None) -> None:
    # systemd's StateDirectory= sets it, colon-separated when there are several.
    environ = {"HOME": "/home/ada", "XDG_DATA_HOME": "/xdg", "STATE_DIRECTORY": "/var/lib/locopilot:/var/lib/other"}
    settings = load_settings(environ)
    assert settings.data_dir == "/var/lib/locopilot"
    assert settings.models_dir == "/var/lib/locopilot/models"


def test_explicit_folders_win(linux: None) -> None:
    environ = {"HOME": "/home/ada", "STATE_DIRECTORY": "/var/lib/locopilot", "LOCOPILOT_DATA_DIR": "/srv/data"}
    assert load_settings(environ).data_dir == "/srv/data"
    assert load_settings(environ).models_dir == "/srv/data/models"
    both = load_settings(environ | {"LOCOPILOT_MODELS_DIR": "/srv/models"})
    assert (both.data_dir, both.models_dir) == ("/srv/data", "/srv/models")


def test_tilde_is_expanded() -> None:
    settings = load_settings({"LOCOPILOT_DATA_DIR": "~/loco", "LOCOPILOT_MODELS_DIR": "~/gguf"})
    assert settings.data_dir == str(Path("~/loco").expanduser())
    assert settings.models_dir == str(Path("~/gguf").expanduser())
    assert "~" not in settings.data_dir


def test_values_are_stripped() -> None:
    settings = load_settings(
        {
            "LOCOPILOT_PORT": " 8081\n",
            "LOCOPILOT_HOST": "\t0.0.0.0 ",
            "LOCOPILOT_LOG_LEVEL": " debug ",
            "LOCOPILOT_DATA_DIR": " /srv/data ",
        }
    )
    assert (settings.port, settings.host, settings.log_level, settings.data_dir) == (
        8081,
        "0.0.0.0",
        "debug",
        "/srv/data",
    )


def test_other_variables_are_ignored() -> None:
    assert load_settings({"PORT": "nonsense", "LOCOPILOT": "x", "locopilot_port": "x", "HOME": "/h"}).port == 8080


@pytest.mark.parametrize(("name", "low", "high"), INT_RANGES)
def test_integer_bounds_are_accepted(name: str, low: int | None, high: int | None) -> None:
    for value in (low, high):
        if value is not None:
            settings = load_settings({env_name(name): str(value), "LOCOPILOT_DATA_DIR": "/d"})
            assert getattr(settings, name) == value


# Refusals


def test_integer_settings_are_found() -> None:
    # Guards the parametrization below against silently testing nothing.
    assert {"port", "ctx_size", "threads", "gpu_layers", "queue_size", "max_body_bytes"} <= set(INT_FIELDS)


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", ["abc", "", "1.5", "0x10", "8 080"])
def test_integer_rejects_non_numbers(name: str, value: str) -> None:
    error = refusal({env_name(name): value})
    assert error.variable == env_name(name)
    message = str(error)
    assert message.startswith(f"{env_name(name)}: ")
    assert "Expected `int`" in message
    info = {i.variable: i for i in describe()}[env_name(name)]
    assert f"allowed: {info.type_name}" in message


@pytest.mark.parametrize(("name", "value", "bound"), out_of_range())
def test_integer_rejects_out_of_range(name: str, value: str, bound: str) -> None:
    error = refusal({env_name(name): value})
    assert error.variable == env_name(name)
    assert f"Expected `int` {bound}" in str(error)
    assert "allowed: integer " in str(error)


def test_port_message_says_what_is_allowed() -> None:
    error = refusal({"LOCOPILOT_PORT": "0"})
    assert str(error) == "LOCOPILOT_PORT: Expected `int` >= 1 (allowed: integer 1…65535; default 8080)"


@pytest.mark.parametrize("value", ["loud", "", "critical"])
def test_log_level_rejects_unknown_levels(value: str) -> None:
    error = refusal({"LOCOPILOT_LOG_LEVEL": value})
    assert error.variable == "LOCOPILOT_LOG_LEVEL"
    assert "debug | info | warning | error" in str(error)


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "INFO", "Warning"])
def test_log_levels(level: str) -> None:
    assert load_settings({"LOCOPILOT_LOG_LEVEL": level}).log_level == level.lower()


@pytest.mark.parametrize("variable", ["LOCOPILOT_FOO", "LOCOPILOT_PROT", "LOCOPILOT_", "LOCOPILOT_port"])
def test_unknown_variable_is_refused(variable: str) -> None:
    error = refusal({variable: "1"})
    assert error.variable == variable
    assert "unknown setting" in str(error)
    assert "LOCOPILOT_PORT" in str(error)  # the message lists what is known


def test_empty_host_is_refused() -> None:
    error = refusal({"LOCOPILOT_HOST": "  "})
    assert error.variable == "LOCOPILOT_HOST"


@pytest.mark.parametrize("value", ["../evil", "a b", "x/y", ""])
def test_default_model_must_be_a_model_name(value: str) -> None:
    assert refusal({"LOCOPILOT_DEFAULT_MODEL": value}).variable == "LOCOPILOT_DEFAULT_MODEL"


def test_settings_error_is_a_value_error() -> None:
    assert isinstance(refusal({"LOCOPILOT_PORT": "x"}), ValueError)


# Documentation


def test_effective_items_lists_every_setting() -> None:
    settings = load_settings({"LOCOPILOT_DATA_DIR": "/d", "LOCOPILOT_PORT": "9"})
    items = dict(effective_items(settings))
    assert list(items) == [info.variable for info in describe()]
    assert items["LOCOPILOT_PORT"] == "9"
    assert items["LOCOPILOT_DATA_DIR"] == "/d"
    assert items["LOCOPILOT_MODELS_DIR"] == "/d/models"


def test_readme_table_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.count(README_START) == 1
    assert text.count(README_END) == 1
    assert with_settings_table(text) == text, "the README's settings table drifted; run `just docs`"


def test_readme_table_has_every_setting() -> None:
    text = README.read_text(encoding="utf-8")
    table = text.split(README_START)[1].split(README_END)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [info.variable for info in describe()]
    for info in describe():
        assert info.description, f"{info.variable} has no description"
        assert info.description in table


def test_settings_table_escapes_pipes() -> None:
    # The log level's alternatives contain `|`, which would otherwise split the Markdown row.
    row = next(line for line in settings_table().splitlines() if "LOCOPILOT_LOG_LEVEL" in line)
    assert "debug \\| info \\| warning \\| error" in row
    assert row.replace("\\|", "").count("|") == 5


def test_with_settings_table_replaces_only_between_markers() -> None:
    readme = f"# title\n\nbefore\n\n{README_START}stale table\n{README_END}\n\nafter\n"
    updated = with_settings_table(readme)
    assert updated == f"# title\n\nbefore\n\n{README_START}{settings_table()}{README_END}\n\nafter\n"
    assert with_settings_table(updated) == updated


# The server refuses to start


def clean_environ(**changes: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")} | changes


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LOCOPILOT_PORT", "0"), ("LOCOPILOT_LOG_LEVEL", "loud"), ("LOCOPILOT_PORTT", "8080")],
)
def test_serve_refuses_bad_setting(tmp_path: Path, variable: str, value: str) -> None:
    environ = clean_environ(LOCOPILOT_DATA_DIR=str(tmp_path / "data"), **{variable: value})
    result = subprocess.run(
        [sys.executable, "-m", "locopilot", "serve"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # it stopped before touching anything


@pytest.mark.parametrize(
    "value",
    ['["claude-*"]', '{"claude-*": 3}', '{"claude-*": "two words"}', '{"": "m"}', '{"a": "m-*"}', "{not json"],
)
def test_bad_model_aliases_name_the_variable(value: str) -> None:
    assert refusal({"LOCOPILOT_MODEL_ALIASES": value}).variable == "LOCOPILOT_MODEL_ALIASES"


def test_model_aliases_put_exact_names_before_globs() -> None:
    value = '{"claude-*": "small", "claude-opus": "large", "gpt-?": "small"}'
    loaded = load_settings({"LOCOPILOT_MODEL_ALIASES": value, "LOCOPILOT_DATA_DIR": "/nonexistent"})
    assert loaded.model_alias_pairs == (("claude-opus", "large"), ("claude-*", "small"), ("gpt-?", "small"))
