"""The ``locopilot`` command line, driven in-process with click's runner and once as a real subprocess."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
from importlib.metadata import version as package_version
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from locopilot import __version__
from locopilot.cli import cli
from locopilot.settings import describe, effective_items, env_name, load_settings
from tests.conftest import SMOL, Server, free_port

SMOL_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1"
QUESTION = "Which city is the capital of France?"

Env = dict[str, str | None]


def make_env(tmp_path: Path, **settings: str) -> Env:
    """The environment for one command: no LOCOPILOT_* variable of ours leaks in, folders under tmp_path."""
    env: Env = {k: None for k in os.environ if k.startswith("LOCOPILOT_")}
    env |= {
        "LOCOPILOT_DATA_DIR": str(tmp_path / "data"),
        "LOCOPILOT_MODELS_DIR": str(tmp_path / "models"),
        # Nothing answers on port 1, so `models` and `pull` work on the folder (as with no server running),
        # and no service env file of this machine is read.
        "LOCOPILOT_PORT": "1",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "COLUMNS": "250",  # rich wraps tables at the terminal width; keep every row on one line
        "NO_COLOR": "1",
    }
    return env | {env_name(k.lower()): v for k, v in settings.items()}


def invoke(env: Env, *args: str, code: int = 0, stdin: str | None = None) -> Result:
    """Run ``locopilot ARGS``; an exception other than an exit is raised, never counted as status 1."""
    result = CliRunner().invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


# config, version, help


def test_help(env: Env) -> None:
    result = invoke(env, "--help")
    for command in ("serve", "config", "version", "models", "chat", "doctor", "service"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), command
    assert "LOCOPILOT_" in result.stdout


@pytest.mark.parametrize("command", ["models", "chat", "doctor", "serve", "config", "service"])
def test_command_help(env: Env, command: str) -> None:
    assert "Usage:" in invoke(env, command, "--help").stdout


def test_unknown_command_is_a_usage_error(env: Env) -> None:
    assert "No such command" in invoke(env, "sevre", code=2).stderr


def test_version(env: Env) -> None:
    lines = invoke(env, "version").stdout.splitlines()
    assert lines == [f"locopilot {__version__}", f"llama-cpp-python {package_version('llama-cpp-python')}"]
    assert __version__ in invoke(env, "--version").stdout


def test_version_shortcut_prints_what_click_prints(env: Env) -> None:
    # `python -m locopilot --version` answers before the CLI is imported; same words as click's option.
    shortcut = subprocess.run(
        [sys.executable, "-m", "locopilot", "--version"], capture_output=True, text=True, check=True
    )
    assert shortcut.stdout == invoke(env, "--version").stdout


def config_rows(output: str) -> dict[str, str]:
    rows = [line.split(None, 1) for line in output.splitlines() if line.strip().startswith("LOCOPILOT_")]
    return {row[0]: row[1].strip() for row in rows}


def test_config_prints_every_setting(tmp_path: Path) -> None:
    env = make_env(tmp_path, PORT="9123", LOG_LEVEL="debug", MODELS_DIR="")
    rows = config_rows(invoke(env, "config").stdout)
    assert list(rows) == [info.variable for info in describe()]
    assert rows["LOCOPILOT_PORT"] == "9123"
    assert rows["LOCOPILOT_LOG_LEVEL"] == "debug"
    assert rows["LOCOPILOT_HOST"] == "127.0.0.1"
    assert rows["LOCOPILOT_DATA_DIR"] == str(tmp_path / "data")
    assert rows["LOCOPILOT_MODELS_DIR"] == str(tmp_path / "data" / "models")  # the effective value, not ""
    expected = load_settings({k: v for k, v in env.items() if k.startswith("LOCOPILOT_") and v is not None})
    assert rows == {k: v or "(not set)" for k, v in effective_items(expected)}


def test_config_prints_brackets_literally(tmp_path: Path) -> None:
    # A path is not rich markup: "[/x]" once crashed the command, "[red]" vanished.
    data = tmp_path / "[red]data[/x]"
    rows = config_rows(invoke(make_env(tmp_path, DATA_DIR=str(data)), "config").stdout)
    assert rows["LOCOPILOT_DATA_DIR"] == str(data)


@pytest.mark.parametrize(("variable", "value"), [("PORT", "http"), ("LOG_LEVEL", "verbose"), ("PROT", "1")])
def test_config_refuses_bad_setting(tmp_path: Path, variable: str, value: str) -> None:
    result = invoke(make_env(tmp_path, **{variable: value}), "config", code=2)
    assert f"error: LOCOPILOT_{variable}" in result.stderr
    assert "LOCOPILOT_HOST" not in result.stdout


# models


def model_names(env: Env) -> list[str]:
    return invoke(env, "models", "list", "--names").stdout.splitlines()


def test_models_empty(env: Env) -> None:
    assert "no models" in invoke(env, "models", "list").stdout
    assert model_names(env) == []


def test_models_add_link_list_show_rm(env: Env, models_dir: Path, smollm2_path: Path) -> None:
    result = invoke(env, "models", "add", "--link", str(smollm2_path))
    assert f"added {SMOL_FILE_NAME}" in result.stdout
    assert "Q4_1" in result.stdout
    link = models_dir / f"{SMOL_FILE_NAME}.gguf"
    assert link.is_symlink()
    assert link.resolve() == smollm2_path.resolve()

    assert model_names(env) == [SMOL_FILE_NAME]
    table = invoke(env, "models", "list").stdout
    assert re.search(rf"^\s*{re.escape(SMOL_FILE_NAME)}\s+\d+\.\d MB\s+llama\s+Q4_1\s+8192\s+gguf\s*$", table, re.M), (
        table
    )

    fields = show_fields(env, SMOL_FILE_NAME)
    assert fields["name"] == SMOL_FILE_NAME
    assert fields["path"] == str(link)
    assert fields["architecture"] == "llama"
    assert fields["quantization"] == "Q4_1"
    assert fields["chat template"] == "gguf"
    assert fields["general.architecture"] == "llama"
    assert "tokenizer.chat_template" not in fields  # long; its presence is the "gguf" above

    assert f"removed {SMOL_FILE_NAME}" in invoke(env, "models", "rm", SMOL_FILE_NAME).stdout
    assert not link.is_symlink()
    assert smollm2_path.is_file()  # the link went, not its target
    assert model_names(env) == []


def show_fields(env: Env, name: str) -> dict[str, str]:
    rows = [
        re.split(r"\s{2,}", line.strip(), maxsplit=1)
        for line in invoke(env, "models", "show", name).stdout.splitlines()
    ]
    return {row[0].strip(): row[1].strip() for row in rows if len(row) == 2}


def test_models_add_copies(env: Env, models_dir: Path, smollm2_path: Path) -> None:
    invoke(env, "models", "add", "--name", "copied", str(smollm2_path))
    copy = models_dir / "copied.gguf"
    assert copy.is_file()
    assert not copy.is_symlink()
    assert filecmp.cmp(copy, smollm2_path, shallow=False)
    assert [p.name for p in models_dir.iterdir()] == ["copied.gguf"]  # no partial copy left behind
    assert model_names(env) == ["copied"]


def test_models_add_with_name(env: Env, smollm2_path: Path) -> None:
    invoke(env, "models", "add", "--link", "--name", "smol:135m", str(smollm2_path))
    invoke(env, "models", "add", "--link", "--name", "another", str(smollm2_path))
    assert model_names(env) == ["another", "smol:135m"]
    assert show_fields(env, "smol:135m")["quantization"] == "Q4_1"


def test_models_add_existing_name(env: Env, smollm2_path: Path) -> None:
    invoke(env, "models", "add", "--link", "--name", "smol", str(smollm2_path))
    result = invoke(env, "models", "add", "--link", "--name", "smol", str(smollm2_path), code=1)
    assert "error: The model 'smol' already exists" in result.stderr


def test_models_add_refuses_non_gguf(env: Env, tmp_path: Path, models_dir: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    result = invoke(env, "models", "add", str(text), code=1)
    assert "is not a usable GGUF file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_models_add_missing_file_is_a_usage_error(env: Env, tmp_path: Path) -> None:
    result = invoke(env, "models", "add", str(tmp_path / "absent.gguf"), code=2)
    assert "does not exist" in result.stderr


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "[/x]"])
def test_models_add_refuses_bad_name(env: Env, tmp_path: Path, smollm2_path: Path, name: str) -> None:
    result = invoke(env, "models", "add", "--link", "--name", name, str(smollm2_path), code=1)
    assert f"Invalid model name {name!r}" in " ".join(result.stderr.split())  # printed literally, not as markup
    assert not (tmp_path / "evil.gguf").exists()
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_models_rm_missing(env: Env) -> None:
    result = invoke(env, "models", "rm", "nope", code=1)
    assert "error: The model 'nope' does not exist" in result.stderr


@pytest.mark.parametrize("name", ["../evil", "[/x]"])
def test_models_rm_bad_name(env: Env, tmp_path: Path, name: str) -> None:
    target = tmp_path / "evil.gguf"
    target.write_bytes(b"GGUF")
    result = invoke(env, "models", "rm", name, code=1)
    assert "Invalid model name" in result.stderr
    assert target.exists()


def test_models_show_missing(env: Env) -> None:
    assert "does not exist" in invoke(env, "models", "show", "nope", code=1).stderr


def test_models_broken_file(env: Env, models_dir: Path) -> None:
    models_dir.mkdir()
    (models_dir / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    assert model_names(env) == ["broken"]
    row = next(line for line in invoke(env, "models", "list").stdout.splitlines() if line.strip().startswith("broken"))
    assert "GGUF version 4294967295 is not supported" in row
    result = invoke(env, "models", "show", "broken", code=1)
    assert "cannot read the model broken" in result.stderr
    assert "removed broken" in invoke(env, "models", "rm", "broken").stdout


def test_models_list_when_folder_is_a_file(env: Env, models_dir: Path) -> None:
    models_dir.write_text("")
    assert "cannot list" in invoke(env, "models", "list", code=1).stderr


def test_entry_point_subprocess(tmp_path: Path, smollm2_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / f"{SMOL}.gguf").symlink_to(smollm2_path)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")}
    environ |= {k: v for k, v in make_env(tmp_path).items() if v is not None}
    result = subprocess.run(
        [sys.executable, "-m", "locopilot", "models", "list", "--names"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{SMOL}\n"


# doctor


def doctor_statuses(output: str) -> dict[str, str]:
    names = ["settings", "data folder", "database", "llama.cpp", "models folder", "free disk", "server"]
    statuses = {}
    for name in names:
        match = re.search(rf"^\s*{re.escape(name)}\s+(ok|warn|FAIL)\s", output, re.MULTILINE)
        if match:
            statuses[name] = match.group(1)
    return statuses


def test_doctor_all_good(tmp_path: Path, smollm2_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / f"{SMOL}.gguf").symlink_to(smollm2_path)
    port = free_port()
    result = invoke(make_env(tmp_path, PORT=str(port)), "doctor")
    assert doctor_statuses(result.stdout) == {
        "settings": "ok",
        "data folder": "ok",
        "database": "ok",
        "llama.cpp": "ok",
        "models folder": "ok",
        "free disk": "ok",
        "server": "warn",
    }, result.stdout
    assert f"nothing answers at http://127.0.0.1:{port}" in result.stdout
    assert (tmp_path / "data" / "locopilot.db").is_file()


def test_doctor_warns_about_missing_default_model(tmp_path: Path, smollm2_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "other.gguf").symlink_to(smollm2_path)
    result = invoke(make_env(tmp_path, PORT=str(free_port())), "doctor")
    assert doctor_statuses(result.stdout)["models folder"] == "warn"
    assert f"default model {SMOL} is missing" in result.stdout


def test_doctor_models_folder_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("")
    result = invoke(make_env(tmp_path, PORT=str(free_port())), "doctor", code=1)
    statuses = doctor_statuses(result.stdout)
    assert statuses["models folder"] == "FAIL"
    assert statuses["settings"] == statuses["data folder"] == statuses["database"] == "ok"
    assert f"{tmp_path / 'models'} is not a folder" in result.stdout


def test_doctor_bad_setting(tmp_path: Path) -> None:
    result = invoke(make_env(tmp_path, PORT="abc"), "doctor", code=1)
    assert doctor_statuses(result.stdout) == {"settings": "FAIL"}
    assert "LOCOPILOT_PORT" in result.stdout
    assert not (tmp_path / "data").exists()  # nothing else was checked, nothing created


# chat, against the shared real server


def server_env(tmp_path: Path, server: Server) -> Env:
    return make_env(tmp_path, PORT=str(server.port))


def test_chat_one_shot(tmp_path: Path, server: Server) -> None:
    env = server_env(tmp_path, server)
    result = invoke(env, "chat", "--model", SMOL, "--temperature", "0", QUESTION)
    assert "Paris" in result.stdout
    assert result.stderr == ""


def test_chat_reads_standard_input_and_default_model(tmp_path: Path, server: Server) -> None:
    env = make_env(tmp_path, PORT=str(server.port), DEFAULT_MODEL=SMOL)
    result = invoke(env, "chat", "-t", "0", "--system", "You are a helpful assistant.", stdin=QUESTION + "\n")
    assert "Paris" in result.stdout


def test_chat_unknown_model(tmp_path: Path, server: Server) -> None:
    # --url wins over LOCOPILOT_PORT, which points at nothing here.
    env = make_env(tmp_path, PORT=str(free_port()))
    result = invoke(env, "chat", "--url", server.url, "--model", "no-such-model", QUESTION, code=1)
    assert "error: The model 'no-such-model' does not exist" in " ".join(result.stderr.split())
    assert result.stdout == ""


def test_chat_cannot_reach(tmp_path: Path) -> None:
    port = free_port()
    result = invoke(make_env(tmp_path, PORT=str(port)), "chat", "--model", SMOL, QUESTION, code=1)
    assert "cannot reach the server" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_refuses_bad_temperature(env: Env) -> None:
    assert "--temperature" in invoke(env, "chat", "--temperature", "5", QUESTION, code=2).stderr
