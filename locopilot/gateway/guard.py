"""The one middleware in front of every route: the Host check, authentication, body screening.

In that order: a rebinding page never reaches authentication, and a body is read only for
a request that authentication let through. Routes with ``exclude_from_auth`` in their
``opt`` (``GET /health``) skip authentication only. The stages are
:class:`~locopilot.gateway.hygiene.HostCheck`, :func:`~locopilot.gateway.auth.admit_request`
(with :func:`~locopilot.gateway.auth.run_audited` around admin changes) and
:func:`~locopilot.gateway.hygiene.screen_request`.

One middleware rather than one per stage: each Litestar middleware is a layer of
coroutines and checks that every request passes through.
"""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from locopilot.gateway.auth import admit_request, run_audited
from locopilot.gateway.hygiene import HostCheck, screen_request

EXCLUDE_FROM_AUTH = "exclude_from_auth"


class GuardMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, check_host: HostCheck) -> None:
        self.check_host = check_host

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        self.check_host(scope)
        audited = False
        if not scope["route_handler"].opt.get(EXCLUDE_FROM_AUTH):
            audited = await admit_request(scope)
        await screen_request(scope, receive)
        if audited:
            await run_audited(scope, receive, send, next_app)
        else:
            await next_app(scope, receive, send)
