"""The command line as a client of a running locopilot server: where it is, the key it sends, its answers.

``locopilot models …`` and ``locopilot pull`` work through the server when one answers
(:func:`connected`), so that on a machine where locopilot runs as a service they change the
service's models folder, not one of the user's that the service cannot see. When none
answers they work on the local folder, and say so in one line on standard error.

Where the server is: ``--url``, else ``LOCOPILOT_HOST`` and ``LOCOPILOT_PORT`` (``https``
when ``LOCOPILOT_TLS_CERT`` is set, a wildcard address reached on loopback). Each is read
from the environment or, where the environment does not set it, from the service's env
file (:func:`service_env_files`: the user service's, then the system service's) if it can
be read. The key: ``--key-file``, else the bootstrap admin key (``LOCOPILOT_ADMIN_KEY`` or
``LOCOPILOT_ADMIN_KEY_FILE``) found the same way. Keys are sent in the Authorization header
and never printed.

:func:`open_client` is the one way a command makes its client (:func:`locopilot.client.sync_client`:
one pool, no proxy from the environment), and :func:`checked` reads a server's error answers
for the command line with :mod:`locopilot.client`'s one error mapping: it prints the message
and exits 1.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import rich_click as click

from locopilot.cli import errors, print_error, settings_or_exit
from locopilot.client import error_detail, sync_client
from locopilot.settings import Settings, SettingsError, load_settings

SERVER_VARIABLES = ("LOCOPILOT_HOST", "LOCOPILOT_PORT", "LOCOPILOT_TLS_CERT", "LOCOPILOT_TLS_KEY")
KEY_VARIABLES = ("LOCOPILOT_ADMIN_KEY", "LOCOPILOT_ADMIN_KEY_FILE")
PROBE_TIMEOUT_S = 5.0

T = TypeVar("T")


def base_url(settings: Settings) -> str:
    """The address of the server ``settings`` describe, as a client on this machine reaches it."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{host}:{settings.port}"


def service_env_files(environ: Mapping[str, str]) -> list[Path]:
    """The env files ``locopilot service install`` writes, the user service's first."""
    from locopilot.service.install import ServiceError, Target

    try:
        return [Target.from_environment(user, environ).env_file for user in (True, False)]
    except ServiceError:  # no service manager on this platform
        return []


@dataclass(frozen=True)
class Server:
    """Where the server is and what to send it (``key`` may be empty: send none)."""

    url: str
    key: str = field(repr=False)
    verify: ssl.SSLContext | bool = True


def find_server(environ: Mapping[str, str], url: str | None = None, key_file: Path | None = None) -> Server:
    """The server to talk to (see the module docstring). Raises SettingsError for a bad value."""
    from locopilot.service import envfile

    values = {name: environ[name] for name in (*SERVER_VARIABLES, *KEY_VARIABLES) if name in environ}
    for path in service_env_files(environ):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:  # missing, or root's (key_hint says so if the server wants a key)
            continue
        try:
            found = envfile.parse(text)
        except ValueError as exc:
            raise SettingsError(str(path), str(exc)) from exc
        for name in SERVER_VARIABLES:
            if name not in values and name in found:
                values[name] = found[name]
        if not any(name in values for name in KEY_VARIABLES):
            values.update({name: found[name] for name in KEY_VARIABLES if name in found})
        break
    settings = load_settings(values)
    # A file, not an option's value: a key on the command line would show in `ps`.
    key = key_file.read_text(encoding="utf-8").strip() if key_file else settings.admin_secret
    verify: ssl.SSLContext | bool = True
    if settings.tls_cert and os.access(settings.tls_cert, os.R_OK):
        # The server's own certificate: enough to trust a self-signed one.
        verify = ssl.create_default_context()
        verify.load_verify_locations(settings.tls_cert)
    return Server(url or base_url(settings), key, verify)


def located(url: str | None, key_file: Path | None) -> Server:
    """:func:`find_server` for a command: a bad setting ends it with status 2."""
    try:
        return find_server(os.environ, url, key_file)
    except SettingsError as exc:
        print_error(str(exc))
        raise SystemExit(2) from exc


def open_client(server: Server) -> httpx.Client:
    """The command's client of ``server`` (one pool; loopback traffic never goes through a proxy)."""
    return sync_client(server.url, server.key, verify=server.verify)


@dataclass(frozen=True)
class Choice:
    """What the command line was told about the server: ``--url``, ``--key-file``, ``--local``."""

    url: str | None = None
    key_file: Path | None = None
    local: bool = False


def server_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--url``, ``--key-file`` and ``--local`` to a command, passed to it as ``server: Choice``."""

    @click.option("--url", help="The server's address (default: LOCOPILOT_HOST and LOCOPILOT_PORT).")
    @click.option(
        "--key-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A file holding an API key with the models scope (default: the bootstrap admin key).",
    )
    @click.option("--local", is_flag=True, help="Work on the local models folder, without asking a server.")
    @functools.wraps(command)
    def wrapper(*args: Any, url: str | None, key_file: Path | None, local: bool, **kwargs: Any) -> Any:
        return command(*args, server=Choice(url, key_file, local), **kwargs)

    return wrapper


@contextmanager
def connected(choice: Choice, *, needed_for: str | None = None) -> Iterator[httpx.Client | None]:
    """A client of the running server, closed on the way out; or None, after a one-line note on standard
    error, when no server answers (or ``--local``): then the caller works on the local models folder.

    ``needed_for`` names what cannot be done without a server (load, unload): then no answer exits 1, as does
    an explicit ``--url`` that does not answer. A connection lost later exits 1 too.
    """
    if choice.local:
        if needed_for:
            print_error(f"{needed_for} needs a running server; leave out --local")
            raise SystemExit(2)
        yield None
        return
    server = located(choice.url, choice.key_file)
    with open_client(server) as client:
        try:
            probe = client.get("/health", timeout=PROBE_TIMEOUT_S)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if needed_for:
                print_error(f"{needed_for} needs a running server, and none answers at {server.url}")
                raise SystemExit(1) from exc
            if choice.url:
                print_error(f"no server answers at {server.url}: {exc}")
                raise SystemExit(1) from exc
            folder = settings_or_exit().models_path
            errors.print(
                f"no locopilot server answers at {server.url}; working on the local folder {folder}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            yield None
            return
        except httpx.TransportError as exc:
            print_error(f"cannot talk to the server at {server.url}: {exc}")
            raise SystemExit(1) from exc
        if probe.status_code == 404:
            print_error(
                f"{server.url} answers, but not as a locopilot server (GET /health: HTTP 404); "
                "pass --url, or --local to work on the local folder"
            )
            raise SystemExit(1)
        if probe.status_code != 503:  # a draining server answers the request itself
            checked(probe)  # a refused Host name, say: the server's words
        try:
            yield client
        except httpx.TransportError as exc:
            print_error(f"lost the server at {server.url}: {exc}")
            raise SystemExit(1) from exc


#: More to say about an error answer (its ``error`` object), or None.
Hint = Callable[[dict[str, Any]], str | None]


def checked(response: httpx.Response, *, hint: Hint | None = None) -> Any:
    """The JSON of a successful answer; otherwise prints the server's message (and ``hint(error)``, if it
    has one) to standard error and exits 1. A refused key says where keys come from."""
    if response.status_code < 400:
        return response.json()
    response.read()
    error = error_detail(response.status_code, response.content)
    message = error.message
    if error.upgrade_url:  # a remote locopilot that wants a paid plan says where to get one
        message += f"; see {error.upgrade_url}"
    extra = hint(msgspec.structs.asdict(error)) if hint is not None else None
    if response.status_code in (401, 403):
        extra = key_hint()
    print_error(f"{message} (HTTP {response.status_code})" + (f"; {extra}" if extra else ""))
    raise SystemExit(1)


def answer(response: httpx.Response, kind: type[T], *, hint: Hint | None = None) -> T:
    """A successful answer decoded as the server's ``kind``; an error answer ends the command (:func:`checked`)."""
    if response.status_code >= 400:
        checked(response, hint=hint)
    return msgspec.json.decode(response.content, type=kind)


def key_hint() -> str:
    """What to do about a refused key: where this command looked for one."""
    files = [str(path) for path in service_env_files(os.environ)]
    unreadable = [path for path in files if Path(path).exists() and not os.access(path, os.R_OK)]
    where = (
        f"{unreadable[0]} holds the service's key and cannot be read by you (run as its owner, e.g. with sudo)"
        if unreadable
        else f"the key is read from LOCOPILOT_ADMIN_KEY(_FILE), else from {' or '.join(files) or 'the env file'}"
    )
    return f"pass --key-file FILE with a key that may do this; {where}"
