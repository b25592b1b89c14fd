"""Training on another locopilot: an upstream of kind ``openai`` in LOCOPILOT_UPSTREAMS whose URL is
another locopilot's ``/v1``.

A job with ``remote: NAME`` is not run here. :meth:`Remotes.submit` uploads its dataset to the
remote's ``/v1/files`` and creates the job with the remote's ``/v1/locopilot/training/jobs``, with
the upstream's API key, inside the client's request: a refusal reaches the client before anything
is queued, and a 401 or 403 reaches it unchanged (the remote's body, a ``pro_subscription_required``
with its ``upgrade_url`` say, is passed through by the app's error handler). The local row keeps
the remote's job id; the job service then follows the remote's log stream (:meth:`Remotes.follow`)
and copies its events and, at its end, its status, result and model (named ``NAME:<model>``, which
routes to it).

The remotes are talked to through :mod:`locopilot.client`: one pool per upstream, made on first
use and closed by :meth:`Remotes.aclose`; answers are the remote's Structs. Errors: httpx failures
become :class:`~locopilot.errors.UpstreamError` (retryable); an error answer is mapped by
:func:`locopilot.client.refusal` (400 InvalidRequest, 404 NotFound, any other an UpstreamError
carrying the remote's status and body), each message after ``remote 'NAME':``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from locopilot.client import JobLogEvent, aevents, answer, async_client, job_log_event, refusal
from locopilot.errors import UpstreamError
from locopilot.schemas.training import FileObject, JobInfo, JobList
from locopilot.settings import UpstreamConfig

JOBS_PATH = "/locopilot/training/jobs"
#: Answers other than the log stream come within this.
ANSWER_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
#: A job's placement asks every remote how busy it is: a slow one is left out.
LOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0, read=10.0)

T = TypeVar("T")


class Remotes:
    """The other locopilots this server sends training jobs to, one client (pool) each."""

    def __init__(self) -> None:
        # By address and key, so an upstream that a reload (SIGHUP) changed gets a client of its own.
        self._clients: dict[tuple[str, str], httpx.AsyncClient] = {}

    def _client(self, upstream: UpstreamConfig) -> httpx.AsyncClient:
        key = (upstream.url, upstream.api_key or "")
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = async_client(*key)
        return client

    async def _answer(self, upstream: UpstreamConfig, request: Awaitable[httpx.Response], kind: type[T]) -> T:
        try:
            response = await request
        except httpx.HTTPError as exc:
            raise UpstreamError(f"remote {upstream.name!r} cannot be reached: {exc}", retryable=True) from exc
        return answer(response, kind, who=f"remote {upstream.name!r}")

    async def submit(self, upstream: UpstreamConfig, dataset: Path, filename: str, job: dict[str, Any]) -> JobInfo:
        """Upload ``dataset`` and create ``job`` (the native request body, less ``training_file``) there;
        the remote's job. Raises as the module docstring says."""
        client = self._client(upstream)
        with dataset.open("rb") as f:
            upload = client.post(
                "/files", data={"purpose": "fine-tune"}, files={"file": (filename, f)}, timeout=ANSWER_TIMEOUT
            )
            uploaded = await self._answer(upstream, upload, FileObject)
        create = client.post(JOBS_PATH, json={**job, "training_file": uploaded.id}, timeout=ANSWER_TIMEOUT)
        return await self._answer(upstream, create, JobInfo)

    async def cancel(self, upstream: UpstreamConfig, job_id: str) -> JobInfo:
        request = self._client(upstream).post(f"{JOBS_PATH}/{job_id}/cancel", timeout=ANSWER_TIMEOUT)
        return await self._answer(upstream, request, JobInfo)

    async def follow(self, upstream: UpstreamConfig, job_id: str, after: int) -> AsyncIterator[JobLogEvent]:
        """The remote job's log events after event ``after``, to its ``end``. NotFound when the remote
        does not know the job; a stream that breaks off raises UpstreamError (retryable)."""
        who = f"remote {upstream.name!r}"
        try:
            async with self._client(upstream).stream(
                "GET", f"{JOBS_PATH}/{job_id}/logs", params={"after": after}
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise refusal(response.status_code, response.content, who=who)
                async for name, data in aevents(response):
                    event = job_log_event(name, data, who=who)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{who} cannot be reached: {exc}", retryable=True) from exc

    async def load(self, upstream: UpstreamConfig, model: str) -> int | None:
        """How many training jobs are queued or running on ``upstream``, another locopilot, if it has ``model``
        in its models folder; None when it has not, or cannot say (unreachable, a key without the ``models``
        and ``training`` scopes, not a locopilot)."""
        client = self._client(upstream)
        try:
            found = await client.get(f"/locopilot/models/{quote(model, safe='')}", timeout=LOAD_TIMEOUT)
            if found.status_code != 200:
                return None
            busy = 0
            for status in ("queued", "running"):
                listed = await client.get(JOBS_PATH, params={"status": status, "limit": 1000}, timeout=LOAD_TIMEOUT)
                if listed.status_code != 200:
                    return None
                busy += len(answer(listed, JobList).data)
            return busy
        except (httpx.HTTPError, msgspec.DecodeError):
            return None

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
