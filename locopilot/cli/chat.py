"""``locopilot chat``: talk to a running server, streaming to the terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import rich_click as click
from rich.markup import escape

from locopilot.cli import console, print_error, settings_or_exit
from locopilot.cli.remote import located, open_client
from locopilot.client import chat_text, events, refusal, stream_error
from locopilot.errors import LocopilotError


def stream_reply(
    client: httpx.Client, model: str, messages: list[dict[str, str]], temperature: float | None = None
) -> Iterator[str]:
    """Yield the reply's text pieces as the server streams them; raises LocopilotError with the server's words."""
    body: dict[str, object] = {"model": model, "messages": messages, "stream": True}
    if temperature is not None:
        body["temperature"] = temperature
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise refusal(response.status_code, response.content)
        for event, data in events(response):
            if event == "error":
                raise stream_error(data)
            yield from chat_text(data)


@click.command()
@click.argument("prompt", required=False)
@click.option("--model", "-m", help="Model to chat with (default: LOCOPILOT_DEFAULT_MODEL).")
@click.option("--url", help="Server address (default: from LOCOPILOT_HOST and LOCOPILOT_PORT).")
@click.option("--system", help="A system message to start the conversation with.")
@click.option(
    "--temperature",
    "-t",
    type=click.FloatRange(0, 2),
    help="Sampling temperature, 0 to 2; 0 always picks the likeliest token (default: the server's).",
)
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding the API key to send (default: the bootstrap admin key, if one is set).",
)
def chat(
    prompt: str | None,
    model: str | None,
    url: str | None,
    system: str | None,
    temperature: float | None,
    key_file: Path | None,
) -> None:
    """Chat with a model on a running server.

    With PROMPT (or text on standard input) it answers once and exits;
    otherwise it starts an interactive chat (Ctrl-D or /exit to leave).
    """
    settings = settings_or_exit()
    server = located(url, key_file)
    model = model or settings.default_model
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    try:
        with open_client(server) as client:
            if prompt:
                _turn(client, model, messages, prompt, temperature)
                return
            console.print(f"chatting with {escape(model)}; Ctrl-D or /exit to leave", style="dim", highlight=False)
            while True:
                try:
                    line = console.input("[bold]> [/]")
                except EOFError:
                    console.print()
                    return
                if line.strip() in ("/exit", "/quit"):
                    return
                if line.strip():
                    _turn(client, model, messages, line, temperature)
    except LocopilotError as exc:
        print_error(exc.message)
        raise SystemExit(1) from exc
    except httpx.TransportError as exc:
        print_error(f"cannot reach the server ({exc}); is `locopilot serve` running?")
        raise SystemExit(1) from exc


def _turn(
    client: httpx.Client, model: str, messages: list[dict[str, str]], text: str, temperature: float | None
) -> None:
    messages.append({"role": "user", "content": text})
    parts: list[str] = []
    for piece in stream_reply(client, model, messages, temperature):
        parts.append(piece)
        console.out(piece, end="", highlight=False)
    console.out("")
    messages.append({"role": "assistant", "content": "".join(parts)})
