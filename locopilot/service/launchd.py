"""The launchd job for macOS: a LaunchAgent in the user's session, as a property list.

``systemd/com.locopilot.plist`` in the repository is :func:`example`;
``locopilot service install --user`` writes :func:`plist` with the settings from
the env file. launchd has no ``EnvironmentFile=``, so the settings are copied into
the job's ``EnvironmentVariables`` (and the file is 0600: it holds the admin key).
"""

from __future__ import annotations

import plistlib

from locopilot.service.systemd import DEFAULT_EXECUTABLE, STOP_TIMEOUT

LABEL = "com.locopilot"

# An XML comment cannot hold two hyphens in a row: no command-line flags in it.
_EXAMPLE_COMMENT = f"""<!--
  locopilot as a launchd agent on macOS (runs as the logged-in user).
  `locopilot service install`, for your user, writes this job with the
  settings from ~/.config/locopilot/locopilot.env; by hand:

    install -m 0755 locopilot {DEFAULT_EXECUTABLE}
    mkdir -p ~/Library/Logs/locopilot
    cp systemd/{LABEL}.plist ~/Library/LaunchAgents/
    # replace YOU below with your user name (launchd does not expand ~ or $HOME)
    launchctl bootstrap gui/$(id -u) ~/Library/LaunchAgents/{LABEL}.plist
    launchctl bootout gui/$(id -u)/{LABEL}      # to stop and unload it

  Settings are LOCOPILOT_* environment variables (see locopilot.env.example).
  KeepAlive restarts it when it exits with an error (like systemd's
  Restart=on-failure), at most every ThrottleInterval seconds; a clean stop
  stays stopped. launchd stops the job with SIGTERM and SIGKILLs it after
  ExitTimeOut seconds, above the server's drain (LOCOPILOT_SHUTDOWN_GRACE).
  Generated from locopilot/service/launchd.py (`just docs`).
-->
"""


def job(executable: str, environment: dict[str, str], log_file: str) -> dict[str, object]:
    """The job's keys: run ``executable serve`` at load, restart on failure, log to ``log_file``."""
    return {
        "Label": LABEL,
        "ProgramArguments": [executable, "serve"],
        "EnvironmentVariables": dict(environment),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": STOP_TIMEOUT,
        "StandardOutPath": log_file,
        "StandardErrorPath": log_file,
    }


def plist(executable: str, environment: dict[str, str], log_file: str) -> bytes:
    """The job as an XML property list."""
    return plistlib.dumps(job(executable, environment, log_file), sort_keys=False)


def example() -> str:
    """``systemd/com.locopilot.plist``: the job for a user named YOU, with a comment on how to install it."""
    home = "/Users/YOU"
    environment = {
        "LOCOPILOT_DATA_DIR": f"{home}/Library/Application Support/locopilot",
        "LOCOPILOT_HOST": "127.0.0.1",
        "LOCOPILOT_PORT": "8080",
    }
    text = plist(DEFAULT_EXECUTABLE, environment, f"{home}/Library/Logs/locopilot/locopilot.log").decode()
    # plistlib writes no comments; ours goes after the DOCTYPE line, before <plist>.
    head, sep, body = text.partition("<plist ")
    return head + _EXAMPLE_COMMENT + sep + body
