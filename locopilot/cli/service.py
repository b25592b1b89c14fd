"""``locopilot service``: install this program as a systemd service (Linux) or a launchd agent (macOS)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import rich_click as click

from locopilot.cli import print_error
from locopilot.service.install import (
    Plan,
    ServiceError,
    Target,
    carry_out,
    check,
    default_executable,
    install_plan,
    uninstall_plan,
)


def carried_out(target: Target, make_plan: Callable[[], Plan], dry_run: bool) -> Plan | None:
    """Check the rights, make the plan and carry it out; with ``dry_run`` print it and return None.
    A refusal is printed and exits with status 1."""
    try:
        if not dry_run:
            check(target, os.geteuid())
        plan = make_plan()
        if dry_run:
            click.echo(plan.describe(), nl=False)
            return None
        carry_out(plan)
    except ServiceError as exc:
        print_error(str(exc))
        raise SystemExit(1) from exc
    return plan


user_option = click.option(
    "--user",
    is_flag=True,
    help="A service of your own user (systemctl --user, or a LaunchAgent on macOS) instead of the system's.",
)
dry_run_option = click.option("--dry-run", is_flag=True, help="Print what would be written and run; change nothing.")
# For tests: a staging root for the system paths (/etc/systemd/system, /etc/locopilot,
# /run/systemd/system) and the platform to act for, so an install can be exercised
# in a temporary folder with a stand-in systemctl or launchctl on PATH.
root_option = click.option("--root", type=click.Path(file_okay=False, path_type=Path), default="/", hidden=True)
platform_option = click.option("--platform", type=click.Choice(["linux", "darwin"]), default=None, hidden=True)


def target_or_exit(user: bool, root: Path, platform: str | None) -> Target:
    try:
        return Target.from_environment(user, os.environ, platform or sys.platform, root)
    except ServiceError as exc:
        print_error(str(exc))
        raise SystemExit(1) from exc


@click.group("service")
def service() -> None:
    """Run locopilot as a service that starts at boot (or login) and restarts on failure."""


@service.command("install")
@user_option
@dry_run_option
@click.option(
    "--executable",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The program the service runs (default: this one). A system service needs it outside /home.",
)
@root_option
@platform_option
def install(user: bool, dry_run: bool, executable: Path | None, root: Path, platform: str | None) -> None:
    """Write and enable the service; create its env file, with a new admin key, if there is none.

    On Linux: a systemd unit in /etc/systemd/system (as root), or in
    ~/.config/systemd/user with --user; settings in /etc/locopilot/locopilot.env
    or ~/.config/locopilot/locopilot.env. On macOS: a LaunchAgent (--user).
    The admin key is printed once; it stays in the env file (mode 0600).
    """
    from locopilot.store.keys import new_secret

    target = target_or_exit(user, root, platform)
    plan = carried_out(
        target,
        lambda: install_plan(target, (executable or default_executable()).absolute(), new_key=new_secret),
        dry_run,
    )
    if plan is None:
        return
    click.echo(f"installed {target.unit_file} and started it")
    if plan.admin_key:
        click.echo(f"admin key (shown once; it is kept in {target.env_file}):\n{plan.admin_key}")
    else:
        click.echo(f"kept the existing settings in {target.env_file}")
    for note in plan.notes:
        click.echo(note)
    if target.platform == "linux":
        scope = " --user" if user else ""
        click.echo(f"status: systemctl{scope} status locopilot; logs: journalctl{scope} -u locopilot -f")
    else:
        click.echo(f"logs: {target.log_file}")


@service.command("uninstall")
@user_option
@dry_run_option
@root_option
@platform_option
def uninstall(user: bool, dry_run: bool, root: Path, platform: str | None) -> None:
    """Stop and disable the service and remove its unit. The env file and the data folder stay."""
    target = target_or_exit(user, root, platform)
    plan = carried_out(target, lambda: uninstall_plan(target), dry_run)
    if plan is None:
        return
    if plan.removals:
        click.echo(f"stopped the service and removed {target.unit_file}")
    for note in plan.notes:
        click.echo(note)
