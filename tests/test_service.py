"""The service files and ``locopilot service install/uninstall``.

The systemd unit is checked by systemd's own ``systemd-analyze verify`` (and its
offline security score), the launchd job by a plistlib round trip. Install and
uninstall run for real into a temporary root, with a stand-in ``systemctl`` /
``launchctl`` on PATH: this container has no systemd as PID 1 (the real
systemctl only answers "System has not been booted with systemd") and launchd is
macOS's, so the stand-in records the command lines it is given, which are the
interface we rely on.
"""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from locopilot.cli import cli
from locopilot.server import STOP_SECONDS
from locopilot.service import envfile, launchd, repository_files, systemd
from locopilot.service.install import ServiceError, Target, check, install_plan
from locopilot.settings import Settings, describe, load_settings
from tests.conftest import SMOL, Server

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian's systemd package has it)"
)


def shutdown_grace() -> float:
    """How long the server may take to stop on SIGTERM by default: its drain, then runners and database."""
    return Settings().shutdown_grace + STOP_SECONDS


# generated files


def test_repository_files_have_no_drift() -> None:
    for relative, text in repository_files().items():
        assert (ROOT / relative).read_text(encoding="utf-8") == text, f"{relative} drifted; run `just docs`"


def test_env_example_lists_every_setting_with_its_default() -> None:
    lines = envfile.example().splitlines()
    for info in describe():
        assert f"#{info.variable}={info.default}" in lines, info.variable
        line = lines.index(f"#{info.variable}={info.default}")
        assert lines[line - 1].startswith("# "), f"{info.variable} has no comment above it"
    # Every line is a comment or blank: the example changes nothing until edited.
    assert all(not line or line.startswith("#") for line in lines)
    assert envfile.parse(envfile.example()) == {}


def test_installed_env_file_sets_the_admin_key(tmp_path: Path) -> None:
    key = "lcp_" + "k" * 43
    values = envfile.parse(envfile.installed(key))
    assert values == {"LOCOPILOT_ADMIN_KEY": key}
    assert load_settings(values | {"HOME": str(tmp_path)}).admin_secret == key


def test_env_parse_follows_environment_file_syntax() -> None:
    text = "# comment\n; also\n\nA=1\n B = two words \nC=\"quoted\"\nD='single'\nE=\n"
    assert envfile.parse(text) == {"A": "1", "B": "two words", "C": "quoted", "D": "single", "E": ""}
    with pytest.raises(ValueError, match="line 2"):
        envfile.parse("A=1\nnot an assignment\n")


# the systemd unit


def service_section(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return dict(parser["Service"])


def test_unit_settings() -> None:
    service = service_section(systemd.unit())
    assert service["ExecStart"] == f"{systemd.DEFAULT_EXECUTABLE} serve"
    assert service["EnvironmentFile"] == f"-{systemd.SYSTEM_ENV_FILE}"
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > shutdown_grace()
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "locopilot"
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }.items():
        assert service[key] == value, key
    # PyInstaller unpacks into $TMPDIR: a private folder on disk, not the (noexec) /tmp or /run.
    assert service["CacheDirectory"] == "locopilot"
    assert service["Environment"] == "TMPDIR=%C/locopilot"
    assert "_MEI" in service["ExecStartPre"]
    assert "PrivateDevices" not in service  # it would hide GPUs


def test_user_unit_has_no_system_only_settings() -> None:
    service = service_section(systemd.unit("/opt/locopilot", user=True))
    assert service["ExecStart"] == "/opt/locopilot serve"
    assert service["EnvironmentFile"] == "-%E/locopilot/locopilot.env"
    assert "DynamicUser" not in service
    assert "StateDirectory" not in service  # the program's own default, as for the CLI
    assert service["KillMode"] == "mixed"
    assert service["MemoryDenyWriteExecute"] == "yes"


@pytest.mark.parametrize("path", ["relative/locopilot", "/opt/my locopilot", "/opt/%n", "/opt/$HOME"])
def test_unit_refuses_an_executable_path_systemd_would_mangle(path: str) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        systemd.unit(path)


def analyze(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    # --user needs a runtime folder to set up its (offline) manager.
    env = os.environ | {"XDG_RUNTIME_DIR": str(tmp_path), "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, env=env, timeout=60)


def fake_program(path: Path) -> Path:
    """An executable file at ``path``: verify checks that ExecStart's program exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def verify(unit_text: str, tmp_path: Path, *, user: bool = False) -> subprocess.CompletedProcess[str]:
    folder = tmp_path / ("user-units" if user else "units")
    folder.mkdir(exist_ok=True)
    unit_file = folder / systemd.UNIT_NAME
    unit_file.write_text(unit_text)
    return analyze(*(["--user"] if user else []), "verify", str(unit_file), tmp_path=tmp_path)


@needs_systemd_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    program = fake_program(tmp_path / "bin" / "locopilot")
    result = verify(systemd.unit(str(program), user=user), tmp_path, user=user)
    # verify exits 0 on a line it ignores ("Failed to parse ..., ignoring"): its output must be empty too.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


@needs_systemd_analyze
def test_verify_catches_a_bad_line(tmp_path: Path) -> None:
    """The check above can fail: a misspelled value is reported even though verify exits 0."""
    program = fake_program(tmp_path / "bin" / "locopilot")
    broken = systemd.unit(str(program)).replace("KillMode=mixed", "KillMode=mixd")
    assert "Failed to parse kill mode" in verify(broken, tmp_path).stderr
    missing = systemd.unit(str(tmp_path / "missing"))
    assert verify(missing, tmp_path).returncode != 0


@needs_systemd_analyze
def test_unit_security_exposure(tmp_path: Path) -> None:
    program = fake_program(tmp_path / "bin" / "locopilot")
    unit_file = tmp_path / systemd.UNIT_NAME
    unit_file.write_text(systemd.unit(str(program)))
    # systemd's exposure score, 0 (locked down) to 10; 1.9 when written. A unit with
    # hardening lost (a line dropped, a value misspelled) scores higher.
    result = analyze("security", "--offline=yes", "--threshold=25", str(unit_file), tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# the launchd job


def test_launchd_example_round_trips() -> None:
    text = (ROOT / "systemd" / "com.locopilot.plist").read_bytes()
    job = plistlib.loads(text)
    assert plistlib.loads(plistlib.dumps(job)) == job
    assert job["Label"] == launchd.LABEL
    assert job["ProgramArguments"] == [systemd.DEFAULT_EXECUTABLE, "serve"]
    environment = job["EnvironmentVariables"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in environment.items())
    assert load_settings(environment).port == 8080  # every variable is a known setting
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}  # restart on failure only
    assert job["ExitTimeOut"] > shutdown_grace()
    assert job["StandardErrorPath"] == job["StandardOutPath"]
    assert job["StandardErrorPath"].startswith("/Users/YOU/Library/Logs/")
    plutil = shutil.which("plutil")
    if plutil:  # macOS
        subprocess.run([plutil, "-lint", str(ROOT / "systemd" / "com.locopilot.plist")], check=True)


# service install / uninstall

FAKE_MANAGER = """\
#!{python}
# A stand-in for systemctl or launchctl (see the module docstring): records its
# arguments as a JSON line, and fails like systemctl without a bus when asked to.
import json, os, sys
with open(os.environ["FAKE_MANAGER_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if os.environ.get("FAKE_MANAGER_FAIL"):
    print("Failed to connect to bus: No medium found", file=sys.stderr)
    sys.exit(1)
"""


class Machine:
    """A temporary system: a root with /run/systemd/system, a home, a bin folder with the stand-ins."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        (self.root / "run" / "systemd" / "system").mkdir(parents=True)
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name in ("systemctl", "launchctl"):
            manager = self.bin / name
            manager.write_text(FAKE_MANAGER.format(python=sys.executable))
            manager.chmod(0o755)
        self.log = tmp_path / "manager.log"
        self.program = fake_program(tmp_path / "opt" / "locopilot")
        self.env: dict[str, str | None] = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": None,
            "FAKE_MANAGER_LOG": str(self.log),
            "FAKE_MANAGER_FAIL": None,
        }

    def run(self, *args: str, code: int = 0, platform: str = "linux", **env: str | None) -> Result:
        command = ["service", *args, "--root", str(self.root), "--platform", platform]
        if args[0] == "install":
            command += ["--executable", str(self.program)]
        result = CliRunner().invoke(cli, command, env=self.env | env, catch_exceptions=False)
        assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
        return result

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def printed_key(result: Result) -> str:
    lines = result.stdout.splitlines()
    key = lines[lines.index(next(line for line in lines if line.startswith("admin key"))) + 1]
    assert key.startswith("lcp_")
    return key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_and_uninstall_system_service(machine: Machine, tmp_path: Path) -> None:
    result = machine.run("install")
    unit_file = machine.root / "etc" / "systemd" / "system" / "locopilot.service"
    env_file = machine.root / "etc" / "locopilot" / "locopilot.env"
    assert unit_file.read_text() == systemd.unit(str(machine.program))
    assert mode(unit_file) == 0o644
    assert mode(env_file) == 0o600
    assert mode(env_file.parent) == 0o700
    key = printed_key(result)
    assert result.stdout.count(key) == 1
    settings = load_settings(envfile.parse(env_file.read_text()) | {"HOME": str(machine.home)})
    assert settings.admin_secret == key
    assert machine.calls() == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "locopilot.service"],
        ["systemctl", "restart", "locopilot.service"],
    ]
    if SYSTEMD_ANALYZE:
        check_file = analyze("verify", str(unit_file), tmp_path=tmp_path)
        assert (check_file.returncode, check_file.stderr) == (0, "")

    # Again (an upgrade): the unit is rewritten, the edited env file kept, no new key.
    env_file.write_text(env_file.read_text() + "LOCOPILOT_PORT=9000\n")
    unit_file.write_text("stale")
    again = machine.run("install")
    assert "admin key" not in again.stdout
    assert "LOCOPILOT_PORT=9000" in env_file.read_text()
    assert unit_file.read_text() == systemd.unit(str(machine.program))
    assert machine.calls()[-1] == ["systemctl", "restart", "locopilot.service"]

    removed = machine.run("uninstall")
    assert not unit_file.exists()
    assert env_file.exists()  # the settings and the admin key stay
    assert str(env_file) in removed.stdout
    assert machine.calls() == [["systemctl", "disable", "--now", "locopilot.service"], ["systemctl", "daemon-reload"]]
    assert "not installed" in machine.run("uninstall").stdout
    assert machine.calls() == []


def test_install_user_service(machine: Machine) -> None:
    result = machine.run("install", "--user")
    unit_file = machine.home / ".config" / "systemd" / "user" / "locopilot.service"
    env_file = machine.home / ".config" / "locopilot" / "locopilot.env"
    assert unit_file.read_text() == systemd.unit(str(machine.program), user=True)
    assert mode(env_file) == 0o600
    assert envfile.parse(env_file.read_text()) == {"LOCOPILOT_ADMIN_KEY": printed_key(result)}
    assert "enable-linger" in result.stdout
    assert machine.calls() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "locopilot.service"],
        ["systemctl", "--user", "restart", "locopilot.service"],
    ]
    assert not (machine.root / "etc").exists()
    machine.run("uninstall", "--user")
    assert not unit_file.exists()
    assert machine.calls() == [
        ["systemctl", "--user", "disable", "--now", "locopilot.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]


def test_install_honours_xdg_config_home(machine: Machine, tmp_path: Path) -> None:
    config = tmp_path / "config"
    machine.run("install", "--user", XDG_CONFIG_HOME=str(config))
    assert (config / "systemd" / "user" / "locopilot.service").is_file()
    assert (config / "locopilot" / "locopilot.env").is_file()


def test_dry_run_writes_and_runs_nothing(machine: Machine) -> None:
    result = machine.run("install", "--dry-run")
    assert systemd.unit(str(machine.program)).splitlines()[0] in result.stdout
    assert "run: systemctl restart locopilot.service" in result.stdout
    assert "LOCOPILOT_ADMIN_KEY=<a new admin key" in result.stdout
    assert "lcp_" not in result.stdout
    assert not (machine.root / "etc").exists()
    assert machine.calls() == []
    # A dry run needs no systemd and no rights: it only prints.
    shutil.rmtree(machine.root / "run")
    machine.run("install", "--dry-run", PATH=str(machine.home))
    (machine.root / "run" / "systemd" / "system").mkdir(parents=True)
    machine.run("install")
    result = machine.run("uninstall", "--dry-run")
    assert "run: systemctl disable --now locopilot.service" in result.stdout
    assert (machine.root / "etc" / "systemd" / "system" / "locopilot.service").exists()


def test_refusals(machine: Machine, tmp_path: Path) -> None:
    no_manager = machine.run("install", code=1, PATH=str(tmp_path / "empty"))
    assert "systemctl not found" in no_manager.stderr
    shutil.rmtree(machine.root / "run")
    assert "systemd is not running" in machine.run("install", code=1).stderr
    assert "use --user" in machine.run("install", code=1, platform="darwin").stderr
    assert not (machine.root / "etc").exists()
    assert machine.calls() == []


def test_refuses_a_system_install_without_root(machine: Machine) -> None:
    def which(name: str) -> str:
        return str(machine.bin / name)

    with pytest.raises(ServiceError, match="needs root: run it with sudo, or use --user"):
        check(Target("linux", user=False, root=machine.root), euid=1000, which=which)
    check(Target("linux", user=True, root=machine.root), euid=1000, which=which)  # a user service needs no root
    check(Target("linux", user=False, root=machine.root), euid=0, which=which)


@pytest.mark.skipif(os.geteuid() == 0, reason="runs as root here; the refusal is checked with check() above")
def test_cli_refuses_a_system_install_without_root(machine: Machine) -> None:
    assert "needs root" in machine.run("install", code=1).stderr


def test_refuses_an_executable_the_service_cannot_run(machine: Machine, tmp_path: Path) -> None:
    private = fake_program(tmp_path / "private" / "locopilot")
    private.chmod(0o700)
    result = CliRunner().invoke(
        cli,
        ["service", "install", "--root", str(machine.root), "--platform", "linux", "--executable", str(private)],
        env=machine.env,
    )
    assert result.exit_code == 1
    assert "readable and executable by all users" in result.stderr
    target = Target("linux", user=False, root=machine.root)
    with pytest.raises(ServiceError, match="under a home folder"):
        install_plan(target, Path("/home/someone/locopilot"), new_key=lambda: "x" * 20)
    assert machine.calls() == []


def test_a_failing_systemctl_is_reported(machine: Machine) -> None:
    result = machine.run("install", code=1, FAKE_MANAGER_FAIL="1")
    assert "`systemctl daemon-reload` failed (exit 1): Failed to connect to bus" in result.stderr
    assert machine.calls() == [["systemctl", "daemon-reload"]]  # nothing after the first failure


def test_install_and_uninstall_launchd_agent(machine: Machine) -> None:
    result = machine.run("install", "--user", platform="darwin")
    plist_file = machine.home / "Library" / "LaunchAgents" / "com.locopilot.plist"
    job = plistlib.loads(plist_file.read_bytes())
    assert mode(plist_file) == 0o600  # it carries the admin key
    assert job["ProgramArguments"] == [str(machine.program), "serve"]
    assert job["EnvironmentVariables"] == {"LOCOPILOT_ADMIN_KEY": printed_key(result)}
    log_file = machine.home / "Library" / "Logs" / "locopilot" / "locopilot.log"
    assert job["StandardErrorPath"] == str(log_file)
    assert log_file.parent.is_dir()  # launchd does not create it
    domain = f"gui/{os.getuid()}"
    assert machine.calls() == [
        ["launchctl", "enable", f"{domain}/com.locopilot"],
        ["launchctl", "bootstrap", domain, str(plist_file)],
    ]

    # Settings come from the env file; installing again picks up an edit.
    env_file = machine.home / ".config" / "locopilot" / "locopilot.env"
    env_file.write_text(env_file.read_text() + "LOCOPILOT_PORT=9001\n")
    machine.run("install", "--user", platform="darwin")
    assert plistlib.loads(plist_file.read_bytes())["EnvironmentVariables"]["LOCOPILOT_PORT"] == "9001"
    assert machine.calls()[0] == ["launchctl", "bootout", f"{domain}/com.locopilot"]

    machine.run("uninstall", "--user", platform="darwin")
    assert not plist_file.exists()
    assert machine.calls() == [["launchctl", "bootout", f"{domain}/com.locopilot"]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_installed_settings_serve_with_the_printed_key(machine: Machine, tmp_path: Path, smollm2_path: Path) -> None:
    """The README's check: the env file install writes, served, answers curl with the key it printed."""
    key = printed_key(machine.run("install", "--user"))
    settings = envfile.parse((machine.home / ".config" / "locopilot" / "locopilot.env").read_text())
    server = Server(tmp_path / "server", {SMOL: smollm2_path}, env=settings).start(path="/health")
    try:
        body = json.dumps({"model": SMOL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]})

        def curl(*args: str) -> tuple[str, str]:
            command = ["curl", "-s", "-w", "\n%{http_code}", *args]
            out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
            text, _, status = out.rpartition("\n")
            return status, text

        assert curl(f"{server.url}/health")[0] == "200"
        chat = [f"{server.url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body]
        assert curl(*chat)[0] == "401"  # the admin key turned authentication on
        status, text = curl(*chat, "-H", f"Authorization: Bearer {key}")
        assert status == "200", text
        assert json.loads(text)["choices"][0]["message"]["content"]
    finally:
        server.stop()
