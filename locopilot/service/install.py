"""Install and uninstall the service: a :class:`Plan` of files and commands, then carrying it out.

:func:`install_plan` and :func:`uninstall_plan` decide everything (paths, file
contents, the ``systemctl`` or ``launchctl`` commands) without touching the system,
so ``--dry-run`` prints exactly what :func:`carry_out` would do. :func:`check`
refuses, with a message that says what to do instead, before anything is written.
Commands run as argument lists, never through a shell.

Raises :class:`ServiceError` for every refusal and for a command that fails.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from locopilot.service import envfile, launchd, systemd

Platform = Literal["linux", "darwin"]

#: Where a system service cannot run a program from: ProtectHome= hides these.
HIDDEN_FROM_SYSTEM_SERVICE = (Path("/home"), Path("/root"), Path("/run/user"))

#: Shown instead of the admin key where a plan is printed (dry run).
KEY_PLACEHOLDER = "<a new admin key, made at install>"


class ServiceError(Exception):
    """Installing or uninstalling cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """Where the service goes. ``root`` prefixes the system paths (``/`` normally; a folder in tests)."""

    platform: Platform
    user: bool
    root: Path = Path("/")
    home: Path = field(default_factory=Path.home)
    config_home: Path | None = None  # $XDG_CONFIG_HOME; None means ~/.config
    uid: int = field(default_factory=os.getuid)

    @classmethod
    def from_environment(
        cls, user: bool, environ: Mapping[str, str], platform: str = sys.platform, root: Path = Path("/")
    ) -> Target:
        if platform not in ("linux", "darwin"):
            raise ServiceError(f"no service manager support for {platform}: run `locopilot serve` under your own")
        xdg = environ.get("XDG_CONFIG_HOME")
        home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
        return cls("linux" if platform == "linux" else "darwin", user, root, home, Path(xdg) if xdg else None)

    @property
    def config_dir(self) -> Path:
        return self.config_home or self.home / ".config"

    @property
    def env_file(self) -> Path:
        if self.user:
            return self.config_dir / "locopilot" / "locopilot.env"
        return self.root / systemd.SYSTEM_ENV_FILE.lstrip("/")

    @property
    def unit_file(self) -> Path:
        """The systemd unit or the launchd property list."""
        if self.platform == "darwin":
            return self.home / "Library" / "LaunchAgents" / f"{launchd.LABEL}.plist"
        if self.user:
            return self.config_dir / "systemd" / "user" / systemd.UNIT_NAME
        return self.root / "etc" / "systemd" / "system" / systemd.UNIT_NAME

    @property
    def log_file(self) -> Path:
        """launchd's log; systemd logs to the journal."""
        return self.home / "Library" / "Logs" / "locopilot" / "locopilot.log"

    @property
    def manager(self) -> str:
        return "launchctl" if self.platform == "darwin" else "systemctl"

    def manager_command(self, *args: str) -> list[str]:
        if self.platform == "darwin":
            return ["launchctl", *args]
        return ["systemctl", *(["--user"] if self.user else []), *args]


@dataclass(frozen=True)
class FileWrite:
    path: Path
    content: bytes
    mode: int
    #: Written only when missing (the env file: an edited one is never replaced).
    keep_existing: bool = False


@dataclass(frozen=True)
class Command:
    argv: list[str]
    #: A failure is expected and harmless (unloading a job that is not loaded).
    may_fail: bool = False


@dataclass
class Plan:
    """What an install or uninstall does, in order: make folders, write files, run commands, remove files."""

    target: Target
    folders: list[tuple[Path, int]] = field(default_factory=list)
    writes: list[FileWrite] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    removals: list[Path] = field(default_factory=list)
    #: The admin key written into a new env file; printed once after the install.
    admin_key: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The plan as text for ``--dry-run``: every folder, file (with its content) and command."""
        parts: list[str] = []
        for path, mode in self.folders:
            parts.append(f"create folder {path} (mode {mode:04o}) if missing")
        for write in self.writes:
            content = write.content.decode()
            if self.admin_key:
                content = content.replace(self.admin_key, KEY_PLACEHOLDER)
            when = " if missing" if write.keep_existing else ""
            indented = "".join(f"    {line}".rstrip() + "\n" for line in content.splitlines())
            parts.append(f"write {write.path} (mode {write.mode:04o}){when}:\n{indented}")
        parts += ["run: " + shlex.join(command.argv) for command in self.commands]
        parts += [f"remove {path}" for path in self.removals]
        parts += [f"note: {note}" for note in self.notes]
        return "\n".join(parts) + "\n"


def default_executable() -> Path:
    """The program to run: this frozen binary, or the ``locopilot`` script that started this process."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable)
    return Path(sys.argv[0]).absolute()


def install_plan(target: Target, executable: Path, *, new_key: Callable[[], str]) -> Plan:
    """The install for ``target``, running ``executable``; ``new_key`` makes the admin key for a new env file."""
    _check_executable(target, executable)
    plan = Plan(target)
    env_exists = target.env_file.exists()
    env_text = target.env_file.read_text(encoding="utf-8") if env_exists else None
    if env_text is None:
        plan.admin_key = new_key()
        env_text = envfile.installed(plan.admin_key)
        plan.folders.append((target.env_file.parent, 0o700))
        plan.writes.append(FileWrite(target.env_file, env_text.encode(), 0o600, keep_existing=True))
    if target.platform == "darwin":
        _plan_launchd(plan, executable, env_text, replacing=target.unit_file.exists())
    else:
        plan.folders.append((target.unit_file.parent, 0o755))
        unit = systemd.unit(str(executable), user=target.user)
        plan.writes.append(FileWrite(target.unit_file, unit.encode(), 0o644))
        plan.commands += [
            Command(target.manager_command("daemon-reload")),
            Command(target.manager_command("enable", systemd.UNIT_NAME)),
            # restart, not start: an install over an older one runs the new executable.
            Command(target.manager_command("restart", systemd.UNIT_NAME)),
        ]
        if target.user:
            plan.notes.append("a user service stops at logout unless lingering is on: loginctl enable-linger")
    return plan


def _plan_launchd(plan: Plan, executable: Path, env_text: str, replacing: bool) -> None:
    target = plan.target
    try:
        environment = envfile.parse(env_text)
    except ValueError as exc:
        raise ServiceError(f"{target.env_file}: {exc}") from exc
    domain = f"gui/{target.uid}"
    plan.folders += [(target.unit_file.parent, 0o755), (target.log_file.parent, 0o700)]
    # 0600: the job carries the settings, admin key included.
    content = launchd.plist(str(executable), environment, str(target.log_file))
    plan.writes.append(FileWrite(target.unit_file, content, 0o600))
    if replacing:  # bootstrap refuses a job that is loaded; unload the old one first
        plan.commands.append(Command(target.manager_command("bootout", f"{domain}/{launchd.LABEL}"), may_fail=True))
    plan.commands += [
        Command(target.manager_command("enable", f"{domain}/{launchd.LABEL}")),
        Command(target.manager_command("bootstrap", domain, str(target.unit_file))),
    ]
    plan.notes.append(f"launchd keeps a copy of the settings: after editing {target.env_file}, install again")


def uninstall_plan(target: Target) -> Plan:
    """Stop and disable the service and remove its unit; the env file and the state stay."""
    plan = Plan(target)
    if not target.unit_file.exists():
        plan.notes.append(f"not installed: {target.unit_file} does not exist")
        return plan
    if target.platform == "darwin":
        domain = f"gui/{target.uid}"
        plan.commands.append(Command(target.manager_command("bootout", f"{domain}/{launchd.LABEL}"), may_fail=True))
        plan.removals.append(target.unit_file)
    else:
        plan.commands.append(Command(target.manager_command("disable", "--now", systemd.UNIT_NAME)))
        plan.removals.append(target.unit_file)
        plan.commands.append(Command(target.manager_command("daemon-reload")))
    plan.notes.append(f"kept: {target.env_file} (the settings and admin key) and the data folder; remove them by hand")
    return plan


def check(target: Target, euid: int, which: Callable[[str], str | None] = shutil.which) -> None:
    """Refuse what cannot work here: missing rights, a missing service manager.

    ``euid`` and ``which`` are the caller's (``os.geteuid``, ``shutil.which``), passed
    in so that a test can ask as someone else.
    """
    if target.platform == "darwin" and not target.user:
        raise ServiceError(
            "on macOS locopilot installs as a LaunchAgent of your user: use --user "
            "(a LaunchDaemon would run it as root)"
        )
    if target.platform == "linux" and not target.user and euid != 0:
        raise ServiceError(
            "installing the system service needs root: run it with sudo, or use --user for a service of your own"
        )
    if which(target.manager) is None:
        raise ServiceError(f"{target.manager} not found on PATH: this system has no {target.manager} to run a service")
    # sd_booted(): systemd creates this folder when it is the init system. In a
    # container without it systemctl exists but cannot talk to any manager.
    if target.platform == "linux" and not (target.root / "run" / "systemd" / "system").is_dir():
        raise ServiceError("systemd is not running on this system (no /run/systemd/system): run `locopilot serve`")


def _check_executable(target: Target, executable: Path) -> None:
    if not executable.is_absolute():
        raise ServiceError(f"{executable}: the service needs an absolute path to the executable")
    system_service = target.platform == "linux" and not target.user
    if system_service and any(executable.is_relative_to(hidden) for hidden in HIDDEN_FROM_SYSTEM_SERVICE):
        raise ServiceError(
            f"{executable} is under a home folder, which the service cannot see (ProtectHome=): "
            f"copy it first, e.g. install -m 0755 {executable} {systemd.DEFAULT_EXECUTABLE}"
        )
    if not (executable.is_file() and os.access(executable, os.X_OK)):
        raise ServiceError(f"{executable} is not an executable file (pass --executable PATH)")
    if system_service and executable.stat().st_mode & 0o005 != 0o005:
        raise ServiceError(
            f"{executable} must be readable and executable by all users (the service runs as a dynamic user): "
            f"chmod 0755 {executable}"
        )
    try:
        systemd.unit(str(executable))
    except ValueError as exc:
        raise ServiceError(str(exc)) from exc


def carry_out(plan: Plan, which: Callable[[str], str | None] = shutil.which) -> None:
    """Make the folders, write the files, run the commands, remove the files, in that order.

    A file is written next to its place and renamed over it, so a reader never sees
    half of one; a ``keep_existing`` file that exists is left alone. Raises
    ServiceError for a command that fails (and is not ``may_fail``), with its output.
    """
    for path, mode in plan.folders:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    for write in plan.writes:
        _write(write)
    for command in plan.commands:
        program = which(command.argv[0]) or command.argv[0]
        result = subprocess.run([program, *command.argv[1:]], capture_output=True, text=True, check=False)
        if result.returncode != 0 and not command.may_fail:
            output = (result.stderr or result.stdout).strip()
            raise ServiceError(f"`{shlex.join(command.argv)}` failed (exit {result.returncode}): {output}")
    for path in plan.removals:
        path.unlink(missing_ok=True)


def _write(write: FileWrite) -> None:
    if write.keep_existing:
        # O_EXCL: an env file made meanwhile (another install) is not overwritten.
        try:
            fd = os.open(write.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, write.mode)
        except FileExistsError:
            return
        os.fchmod(fd, write.mode)  # the umask may have taken bits off
        with os.fdopen(fd, "wb") as file:
            file.write(write.content)
        return
    temporary = write.path.with_name(f".{write.path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, write.mode)
    with os.fdopen(fd, "wb") as file:
        file.write(write.content)
    os.chmod(temporary, write.mode)  # the umask may have taken bits off
    os.replace(temporary, write.path)
