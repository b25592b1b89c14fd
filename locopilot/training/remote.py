"""Training on another locopilot: an upstream of kind ``openai`` in LOCOPILOT_UPSTREAMS whose URL is
another locopilot's ``/v1``.

A job with ``remote: NAME`` is not run here. :func:`submit` uploads its dataset to the remote's
``/v1/files`` and creates the job with the remote's ``/v1/locopilot/training/jobs``, with the
upstream's API key, inside the client's request: a refusal reaches the client before anything is
queued, and a 401 or 403 reaches it unchanged (the remote's body, a ``pro_subscription_required``
with its ``upgrade_url`` say, is passed through by the app's error handler). The local row keeps
the remote's job id; :func:`mirror` then follows the remote's log stream and copies its events
and, at its end, its status, result and model (named ``NAME:<model>``, which routes to it).

Errors: httpx failures become :class:`~locopilot.errors.UpstreamError` (retryable); the remote's
400 and 404 become InvalidRequest and NotFound with its message; any other non-2xx answer an
UpstreamError carrying the remote's status and body.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from locopilot.errors import InvalidRequest, LocopilotError, NotFound, UpstreamError
from locopilot.settings import UpstreamConfig

JOBS_PATH = "/locopilot/training/jobs"


def client_for(upstream: UpstreamConfig, *, read_timeout: float | None = 60.0) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    return httpx.AsyncClient(
        base_url=upstream.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60.0, connect=10.0, read=read_timeout)
    )


def _refusal(upstream: UpstreamConfig, response: httpx.Response) -> LocopilotError:
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    said = f"remote {upstream.name!r}: {message}"
    if response.status_code == 400:
        return InvalidRequest(said)
    if response.status_code == 404:
        return NotFound(said)
    return UpstreamError(
        said,
        retryable=response.status_code >= 500,
        upstream_status=response.status_code,
        upstream_body=response.content,
    )


async def _checked(upstream: UpstreamConfig, request: Any) -> dict[str, Any]:
    try:
        response = await request
    except httpx.HTTPError as exc:
        raise UpstreamError(f"remote {upstream.name!r} cannot be reached: {exc}", retryable=True) from exc
    if response.status_code >= 400:
        raise _refusal(upstream, response)
    body: dict[str, Any] = response.json()
    return body


async def submit(upstream: UpstreamConfig, dataset: Path, filename: str, job: dict[str, Any]) -> dict[str, Any]:
    """Upload ``dataset`` and create ``job`` (the native request body, less ``training_file``) there;
    the remote's job. Raises as the module docstring says."""
    async with client_for(upstream) as client:
        with dataset.open("rb") as f:
            uploaded = await _checked(
                upstream, client.post("/files", data={"purpose": "fine-tune"}, files={"file": (filename, f)})
            )
        return await _checked(upstream, client.post(JOBS_PATH, json={**job, "training_file": uploaded["id"]}))


async def cancel(upstream: UpstreamConfig, job_id: str) -> dict[str, Any]:
    async with client_for(upstream) as client:
        return await _checked(upstream, client.post(f"{JOBS_PATH}/{job_id}/cancel"))


async def follow(upstream: UpstreamConfig, job_id: str, after: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The remote job's log events after ``after`` (``(event, data)``), to its ``end``."""
    async with (
        client_for(upstream, read_timeout=None) as client,
        client.stream("GET", f"{JOBS_PATH}/{job_id}/logs", params={"after": after}) as response,
    ):
        if response.status_code >= 400:
            await response.aread()
            raise _refusal(upstream, response)
        name = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield name, json.loads(line.removeprefix("data: "))


async def load(upstream: UpstreamConfig, model: str) -> int | None:
    """How many training jobs are queued or running on ``upstream``, another locopilot, if it has ``model``
    in its models folder; None when it has not, or cannot say (unreachable, a key without the ``models`` and
    ``training`` scopes, not a locopilot)."""
    try:
        async with client_for(upstream, read_timeout=10.0) as client:
            if (await client.get(f"/locopilot/models/{quote(model, safe='')}")).status_code != 200:
                return None
            busy = 0
            for status in ("queued", "running"):
                listed = await client.get(JOBS_PATH, params={"status": status, "limit": 1000})
                if listed.status_code != 200:
                    return None
                busy += len(listed.json()["data"])
            return busy
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
