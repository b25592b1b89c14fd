#!/usr/bin/env python3
"""Stand-ins for the tunnel programs ``locopilot expose`` runs, named by the name they are run as.

Put links named ``cloudflared``, ``tailscale`` and ``ssh`` to this file first on PATH. Each prints
what the real program prints when its tunnel is up, on the stream the real one uses, and then
waits until it is signalled (SIGTERM or SIGINT: exit 0). Nothing is sent anywhere.

- ``cloudflared tunnel --url URL`` (a quick tunnel): its log lines on standard error, the public
  URL in the box cloudflared draws (cmd/cloudflared/tunnel/quick_tunnel.go).
- ``tailscale funnel TARGET`` (foreground): on standard output, ``Available on the internet:``,
  a blank line, ``https://NODE.TAILNET.ts.net/``, ``|-- proxy TARGET``, a blank line and
  ``Press Ctrl+C to exit.`` (cmd/tailscale/cli/serve_v2.go).
- ``ssh -R 80:HOST:PORT nokey@localhost.run``: localhost.run's banner and its
  ``NAME.lhr.life tunneled with tls termination, https://NAME.lhr.life`` line; for a target
  ending in ``serveo.net``, serveo's ``Forwarding HTTP traffic from https://NAME.serveo.net``.

Environment: ``FAKE_TUNNEL_LOG`` (a file: the program's name, argument list and pid are written
there as one JSON line when it starts, and ``stopped`` when it ends); ``FAKE_TUNNEL_NAME`` (the
random part of the public name); ``FAKE_TUNNEL_EXIT`` (exit with this status right after
printing, as a tunnel that loses its connection does); ``FAKE_TUNNEL_SILENT`` (print nothing
that holds a URL: a tunnel that never comes up).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def log(entry: object) -> None:
    if path := os.environ.get("FAKE_TUNNEL_LOG"):
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


def cloudflared(name: str, silent: bool) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    url = f"https://{name}.trycloudflare.com"
    box = [
        "+--------------------------------------------------------------------------------------------+",
        "|  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |",
        f"|  {url:<90}|",
        "+--------------------------------------------------------------------------------------------+",
    ]
    lines = [
        "INF Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick way to "
        "experiment and try it out. However, be aware that these account-less Tunnels have no uptime guarantee, "
        "are subject to the Cloudflare Online Services Terms of Use (https://www.cloudflare.com/website-terms/), "
        "and Cloudflare reserves the right to investigate your use of Tunnels for violations of such terms. If you "
        "intend to use Tunnels in production you should use a pre-created named tunnel by following: "
        "https://developers.cloudflare.com/cloudflare-one/connections/connect-apps",
        "INF Requesting new quick Tunnel on trycloudflare.com...",
        *([] if silent else [f"INF {row}" for row in box]),
        "INF Version 2024.8.2",
        "INF Initial protocol quic",
    ]
    for line in lines:
        print(f"{stamp} {line}", file=sys.stderr, flush=True)


def tailscale(name: str, target: str, silent: bool) -> None:
    if silent:
        print("Funnel is not enabled on your tailnet.", flush=True)
        return
    url = f"https://{name}.tail1a2b3c.ts.net/"
    print(f"Available on the internet:\n\n{url}\n|-- proxy {target}\n\nPress Ctrl+C to exit.", flush=True)


def ssh(name: str, target: str, silent: bool) -> None:
    if target.endswith("serveo.net"):
        if not silent:
            print(f"Forwarding HTTP traffic from https://{name}.serveo.net", flush=True)
        return
    print(
        "\n===============================================================================\n"
        "Welcome to localhost.run!\n\n"
        "Follow your favourite reverse tunnel at [https://twitter.com/localhost_run].\n\n"
        "To set up and manage custom domains go to https://admin.localhost.run/\n\n"
        "More details on custom domains (and how to enable subdomains of your custom\n"
        "domain) at https://localhost.run/docs/custom-domains\n"
        "===============================================================================\n\n"
        "** your connection id is 0b1d2c3e-4f50-6172-8394-a5b6c7d8e9f0, please mention it if you send me a "
        "message about an issue. **\n",
        flush=True,
    )
    if not silent:
        print(f"{name}.lhr.life tunneled with tls termination, https://{name}.lhr.life", flush=True)


def main() -> int:
    program = Path(sys.argv[0]).name
    args = sys.argv[1:]
    name = os.environ.get("FAKE_TUNNEL_NAME", "fancy-words-0123")
    silent = bool(os.environ.get("FAKE_TUNNEL_SILENT"))
    stopped = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log({"program": program, "args": args, "pid": os.getpid()})
    if program == "cloudflared":
        cloudflared(name, silent)
    elif program == "tailscale":
        tailscale(name, args[-1], silent)
    elif program == "ssh":
        ssh(name, args[-1], silent)
    else:
        print(f"{program}: not a tunnel program this stand-in knows", file=sys.stderr)
        return 2
    if (status := os.environ.get("FAKE_TUNNEL_EXIT")) is not None:
        print("ERR connection to the edge lost", file=sys.stderr, flush=True)
        log("stopped")
        return int(status)
    while not stopped:
        time.sleep(0.05)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
