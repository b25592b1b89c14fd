"""``locopilot expose``: publish the running server on the internet through a tunnel program.

The order matters, so that a tunnel never reaches a server that answers without a key:

1. the tunnel program is looked up on PATH (never downloaded);
2. the server is asked (``GET /v1/admin/hosts``, admin scope) whether it requires API keys;
   one that answers without a key is refused before anything starts;
3. the program is started with an argument list (no shell) and its output is read line by line
   until it prints its public URL;
4. the URL's host name is added to the names the running server answers to
   (``POST /v1/admin/hosts``: the Host check would refuse the tunnel's requests otherwise),
   and the URL is printed;
5. when the program exits, or on Ctrl-C (the program is then stopped), the name is removed again.

While the tunnel runs the name is added again every :data:`REASSERT_SECONDS` (an idempotent call):
a server worker that restarted has forgotten it.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import rich_click as click

from locopilot.cli import console, errors, print_error
from locopilot.cli.remote import Choice, checked, connected

REASSERT_SECONDS = 30.0
STOP_SECONDS = 5.0
TAIL_LINES = 20


@dataclass(frozen=True)
class Tunnel:
    """One tunnel program: how to run it for an origin, and where its output names the public URL."""

    program: str
    arguments: Callable[[str, str], list[str]]
    """(origin URL, ssh target) → the program's arguments."""
    url: re.Pattern[str]
    """Group 1 is the public URL, in one line of its output."""
    hint: str


def forward_host(origin: str) -> str:
    """The origin's host as ssh's ``-R`` takes it: an IPv6 address in brackets."""
    host = urlsplit(origin).hostname or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


TUNNELS = {
    # A quick tunnel (no account): cloudflared logs the URL on standard error in a box.
    "cloudflared": Tunnel(
        "cloudflared",
        lambda origin, _: ["tunnel", "--no-autoupdate", "--url", origin],
        re.compile(r"(https://[a-z0-9-]+\.trycloudflare\.com)\b"),
        "install cloudflared from Cloudflare's packages or your distribution's",
    ),
    # `tailscale funnel TARGET` in the foreground prints the node's https://NODE.TAILNET.ts.net/ URL.
    "tailscale": Tunnel(
        "tailscale",
        lambda origin, _: ["funnel", origin],
        re.compile(r"^(https://[a-z0-9.-]+\.ts\.net)/?\s*$"),
        "install Tailscale and log in; Funnel must be allowed in the tailnet's policy",
    ),
    # An ssh reverse tunnel to a service that names it: localhost.run's or serveo's line.
    "ssh": Tunnel(
        "ssh",
        lambda origin, target: [
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ServerAliveInterval=30",
            "-R",
            f"80:{forward_host(origin)}:{urlsplit(origin).port}",
            target,
        ],
        re.compile(r"(?:tunneled with tls termination, |Forwarding HTTP traffic from )(https://[a-z0-9.-]+)"),
        "install an OpenSSH client",
    ),
}


def origin_of(server_url: str) -> str:
    """The address the tunnel program reaches the server at (a URL without a path)."""
    parts = urlsplit(server_url)
    return f"{parts.scheme}://{parts.netloc}"


@click.command()
@click.option(
    "--provider",
    type=click.Choice(sorted(TUNNELS)),
    default="cloudflared",
    show_default=True,
    help="The tunnel program to run (found on PATH).",
)
@click.option(
    "--ssh-target",
    default="nokey@localhost.run",
    show_default=True,
    help="With --provider ssh: the tunnel service to log in to (localhost.run or serveo.net).",
)
@click.option("--url", help="The server's address (default: LOCOPILOT_HOST and LOCOPILOT_PORT).")
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding an API key with the admin scope (default: the bootstrap admin key).",
)
@click.option("--verbose", "-v", is_flag=True, help="Show the tunnel program's output as it comes.")
def expose(provider: str, ssh_target: str, url: str | None, key_file: Path | None, verbose: bool) -> None:
    """Publish the running server on the internet through a tunnel until stopped (Ctrl-C).

    Refuses a server that answers without an API key. The tunnel's host name is allowed on the
    running server while the tunnel runs, and removed when it stops.
    """
    tunnel = TUNNELS[provider]
    program = shutil.which(tunnel.program)
    if program is None:
        print_error(f"{tunnel.program} is not on PATH; {tunnel.hint}")
        raise SystemExit(1)
    with connected(Choice(url, key_file), needed_for="expose") as client:
        assert client is not None  # needed_for: no server exits
        hosts = checked(client.get("/v1/admin/hosts"))
        if not hosts.get("keys_required", False):
            print_error(
                "this server answers without an API key; create one with `locopilot keys create NAME` "
                "(and use it from then on) before publishing it"
            )
            raise SystemExit(1)
        origin = origin_of(str(client.base_url))
        status = run_tunnel(client, [program, *tunnel.arguments(origin, ssh_target)], tunnel.url, verbose)
    raise SystemExit(status)


def run_tunnel(client: httpx.Client, argv: list[str], pattern: re.Pattern[str], verbose: bool) -> int:
    """Run the tunnel program until it exits or Ctrl-C, the host allowed while its URL is known.
    Returns the command's exit status."""
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process, lines), daemon=True)
    reader.start()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    host: str | None = None
    interrupted = False
    try:
        while True:
            try:
                line = lines.get(timeout=REASSERT_SECONDS)
            except queue.Empty:
                if host is not None:
                    checked(client.post("/v1/admin/hosts", json={"host": host}))
                continue
            if line is None:
                break
            tail.append(line)
            if verbose:
                errors.print(line, markup=False, highlight=False)
            if host is None and (found := pattern.search(line)):
                public = found.group(1).rstrip("/")
                name = urlsplit(public).hostname or ""
                checked(client.post("/v1/admin/hosts", json={"host": name}))
                host = name
                console.print(
                    f"Published at {public}\nOpenAI-compatible clients: base URL {public}/v1 with an API key\n"
                    "Press Ctrl-C to stop.",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        code = stop(process)
        if host is not None:
            forget(client, host)
    if interrupted:
        console.print("Tunnel stopped.", markup=False, highlight=False)
        return 0
    what = "the tunnel program" if host else "the tunnel program, before it named a public URL,"
    print_error(f"{what} exited with status {code}" + (":\n" + "\n".join(tail) if tail and not verbose else ""))
    return 1


def read_lines(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Put each line of the program's output in ``lines``, then None at its end."""
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line.rstrip("\r\n"))
    lines.put(None)


def stop(process: subprocess.Popen[str]) -> int:
    """Stop the program (SIGTERM, then SIGKILL after :data:`STOP_SECONDS`); its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def forget(client: httpx.Client, host: str) -> None:
    """Remove the tunnel's name from the server; a server that is gone or forgot it already is fine."""
    try:
        response = client.delete(f"/v1/admin/hosts/{quote(host, safe='')}")
    except httpx.TransportError as exc:
        errors.print(f"could not remove {host} from the server's host names: {exc}", markup=False)
        return
    if response.status_code not in (200, 404):
        checked(response)
