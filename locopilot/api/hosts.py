"""Admin routes (scope ``admin``): the Host names the running server answers to.

``locopilot expose`` publishes the server through a tunnel whose public name it learns only
once the tunnel program prints it; requests through the tunnel carry that name in their
``Host`` header, which the Host check (:class:`~locopilot.gateway.hygiene.HostCheck`)
refuses unless it is allowed. These routes add and remove such names on the running server,
without a restart and without touching ``LOCOPILOT_ALLOWED_HOSTS``: a quick tunnel's name
changes every time, so it lives as long as the process (or until removed) and is never
written anywhere. Each change is audited like every admin change.

A name is refused (409, ``server_open``) while the server answers without keys: a tunnel to
an unauthenticated server would hand it to the internet.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import Parameter

from locopilot.api.responses import BODY, GUARDED, answers, json_response
from locopilot.errors import Conflict, InvalidRequest, NotFound
from locopilot.gateway.auth import Authenticator, note
from locopilot.gateway.hygiene import HostCheck, host_name

#: A DNS name (no port, no scheme): labels of letters, digits and inner hyphens.
NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


class HostSpec(msgspec.Struct, forbid_unknown_fields=True):
    host: Annotated[str, msgspec.Meta(max_length=253, description="A DNS name, without scheme or port.")]


class Hosts(msgspec.Struct):
    """The names the server answers to. ``checked``: false when it answers to any (no Host check on this bind);
    ``keys_required``: false when it answers without an API key (then no name can be added)."""

    checked: bool
    keys_required: bool
    configured: list[str]
    added: list[str]
    object: str = "hosts"


async def hosts_of(hosts: HostCheck, auth: Authenticator) -> Hosts:
    return Hosts(
        checked=hosts.checked,
        keys_required=not await auth.is_open(),
        configured=sorted(hosts.allowed or ()),
        added=sorted(hosts.added),
    )


def valid_name(raw: str) -> str:
    name = raw.strip().lower().removesuffix(".")
    if not NAME.match(name):
        raise InvalidRequest(
            f"'{raw[:100]}' is not a host name (letters, digits, hyphens and dots; no scheme or port).", param="host"
        )
    return name


@get("/v1/admin/hosts", responses=answers(Hosts, 200, *GUARDED))
async def list_hosts(hosts: HostCheck, auth: Authenticator) -> Response[bytes]:
    """The Host names this server answers to: from the settings, and those added while it runs."""
    return json_response(await hosts_of(hosts, auth))


@post("/v1/admin/hosts", status_code=200, responses=answers(Hosts, 200, *GUARDED, *BODY, 409))
async def add_host(
    data: HostSpec, hosts: HostCheck, auth: Authenticator, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """Answer to one more Host name until the server stops or the name is removed; refused (409) while the
    server needs no API key."""
    name = valid_name(data.host)
    if await auth.is_open():
        raise Conflict(
            "This server answers without an API key; create one (`locopilot keys create NAME`) before publishing it.",
            code="server_open",
        )
    hosts.allow(name)
    note(request, "host_added", host=name)
    return json_response(await hosts_of(hosts, auth))


@delete("/v1/admin/hosts/{host:str}", status_code=200, responses=answers(Hosts, 200, *GUARDED, 400, 404))
async def remove_host(
    host: Annotated[str, Parameter(max_length=253)],
    hosts: HostCheck,
    auth: Authenticator,
    request: Request[Any, Any, Any],
) -> Response[bytes]:
    """Stop answering to a name added while the server runs (names from the settings stay)."""
    name = valid_name(host)
    if not hosts.disallow(host_name(name)):
        raise NotFound(f"'{name}' was not added to this server.", param="host")
    note(request, "host_removed", host=name)
    return json_response(await hosts_of(hosts, auth))


ROUTES = [list_hosts, add_host, remove_host]
