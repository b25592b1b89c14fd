"""OpenAI's Responses API: ``/v1/responses`` and its stored responses.

``POST /v1/responses`` is a front like chat completions: its body becomes one
GenerationRequest (:mod:`locopilot.api.responses_input`) run by
:func:`~locopilot.api.generation.serve_generation`, and
:class:`~locopilot.api.responses_format.ResponsesFormatter` writes the answer as a Response
object or as the Responses event stream. Unless ``store`` is false, the finished response
(its input items, output items, usage and settings) is stored in SQLite before its last
bytes go out (:mod:`locopilot.store.responses`); ``previous_response_id`` continues from a
stored response by replaying its chain's items, and ``item_reference`` input items name
stored items.

A stored response is visible to the API key that created it, to admin keys, and to every
request on an open server (no keys); to anyone else it does not exist (404).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from litestar import Request, Response, delete, get, post
from litestar.params import Parameter
from litestar.response import Stream

from locopilot.api.generation import serve_generation
from locopilot.api.responses import BODY, GUARDED, ROUTED, answers
from locopilot.api.responses_format import ResponsesFormatter, new_id
from locopilot.api.responses_input import Prepared, Translated, decode_item, translate
from locopilot.api.services import Pipeline
from locopilot.errors import InvalidRequest, LocopilotError, NotFound
from locopilot.gateway.auth import Principal, principal_of
from locopilot.gateway.streaming import Reply
from locopilot.providers.base import GenerationRequest, SamplingParams
from locopilot.schemas.openai import encoder
from locopilot.schemas.responses import (
    ItemList,
    ItemReference,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    TextConfig,
)
from locopilot.store import responses as store
from locopilot.store.db import Database


def visible(principal: Principal, owner: str | None) -> bool:
    """Whether ``principal`` may see a stored response or item created by the key ``owner``."""
    return principal.key_id is None or "admin" in principal.scopes or principal.key_id == owner


def not_found(response_id: str, param: str = "response_id") -> NotFound:
    return NotFound(f"Response with id '{response_id[:128]}' not found.", param=param, code="response_not_found")


async def prepare(db: Database, principal: Principal, body: ResponsesRequest) -> Prepared:
    """Read the stored chain and referenced items; a missing or foreign one is kept as the failure,
    raised when the generation is built (so that it is counted and logged like any bad request)."""
    prepared = Prepared()
    try:
        if body.previous_response_id is not None:
            previous = body.previous_response_id
            found = await db.call(store.owner_of, previous)
            if found is None or not visible(principal, found.key_id):
                raise not_found(previous, "previous_response_id")
            prepared.history = await db.call(store.conversation, previous)
        if isinstance(body.input, list):
            for index, raw in enumerate(body.input):
                if raw.get("type") != "item_reference":
                    continue
                reference = decode_item(raw, f"input[{index}]")
                assert isinstance(reference, ItemReference)
                stored = await db.call(store.item, reference.id)
                if stored is None or not visible(principal, stored.key_id):
                    raise NotFound(f"Item with id '{reference.id}' not found.", param=f"input[{index}].id")
                prepared.references[reference.id] = stored.item
    except LocopilotError as exc:
        prepared.failure = exc
    return prepared


def skeleton(body: ResponsesRequest, translated: Translated | None, response_id: str) -> ResponseObject:
    """The response before generation: ``in_progress``, with the request's settings echoed."""
    sampling = translated.generation.sampling if translated is not None else SamplingParams()
    return ResponseObject(
        id=response_id,
        created_at=int(time.time()),
        model=body.model,
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        metadata=body.metadata or {},
        parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        previous_response_id=body.previous_response_id,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        text=body.text or TextConfig(),
        tool_choice=translated.tool_choice if translated is not None else "auto",
        tools=translated.tools if translated is not None else [],
        truncation=body.truncation or "disabled",
        store=body.store is not False,
        user=body.user,
    )


# Routes


@post("/v1/responses", status_code=200, responses=answers(ResponseObject, 200, *GUARDED, *BODY, *ROUTED))
async def create_response(
    data: ResponsesRequest, pipeline: Pipeline, db: Database, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    principal = principal_of(request)
    prepared = await prepare(db, principal, data)
    response_id = new_id("resp")
    translated: Translated | None = None
    formatter: ResponsesFormatter | None = None

    def build() -> GenerationRequest:
        nonlocal translated
        translated = translate(data, prepared, pipeline.settings.max_message_bytes)
        return translated.generation

    def make_formatter(_request_id: str) -> ResponsesFormatter:
        nonlocal formatter
        formatter = ResponsesFormatter(skeleton(data, translated, response_id))
        return formatter

    async def keep(reply: Reply) -> None:
        assert formatter is not None and translated is not None
        final = formatter.final(reply)
        record = store.StoredResponse(
            id=final.id,
            key_id=principal.key_id,
            model=final.model,
            status=final.status,
            previous_response_id=final.previous_response_id,
            created_at=time.time(),
            body=encoder.encode(final).decode(),
        )
        inputs = [(item.id or "", encoder.encode(item).decode()) for item in translated.inputs]
        outputs = [(item.id or "", encoder.encode(item).decode()) for item in final.output]
        await db.asubmit(lambda conn: store.insert(conn, record, inputs, outputs))

    return await serve_generation(
        pipeline,
        request,
        endpoint="responses",
        id_prefix="resp",
        model=data.model,
        stream=data.stream,
        build=build,
        formatter=make_formatter,
        on_reply=keep if data.store is not False else None,
    )


async def _visible_response(db: Database, request: Request[Any, Any, Any], response_id: str) -> store.Owner:
    found = await db.call(store.owner_of, response_id)
    if found is None or not visible(principal_of(request), found.key_id):
        raise not_found(response_id)
    return found


@get("/v1/responses/{response_id:str}", responses=answers(ResponseObject, 200, *GUARDED, 400, 404))
async def get_response(
    response_id: str, db: Database, request: Request[Any, Any, Any], stream: bool = False
) -> Response[bytes]:
    """A stored response, as it was answered."""
    found = await _visible_response(db, request, response_id)
    if stream:
        raise InvalidRequest(
            "Only background responses can be streamed again; locopilot does not run background responses.",
            param="stream",
        )
    return Response(found.body.encode(), media_type="application/json")


@delete("/v1/responses/{response_id:str}", status_code=200, responses=answers(ResponseDeleted, 200, *GUARDED, 400, 404))
async def delete_response(response_id: str, db: Database, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Delete a stored response and its items; a later response it was continued by keeps its own items."""
    await _visible_response(db, request, response_id)
    await db.asubmit(lambda conn: store.delete(conn, response_id))
    return Response(encoder.encode(ResponseDeleted(response_id)), media_type="application/json")


@post(
    "/v1/responses/{response_id:str}/cancel",
    status_code=200,
    responses=answers(ResponseObject, 200, *GUARDED, 400, 404),
)
async def cancel_response(response_id: str, db: Database, request: Request[Any, Any, Any]) -> Response[bytes]:
    """OpenAI cancels only background responses, which locopilot does not run: every stored one is finished."""
    await _visible_response(db, request, response_id)
    raise InvalidRequest("Cannot cancel a synchronous response.", param="response_id")


@get("/v1/responses/{response_id:str}/input_items", responses=answers(ItemList, 200, *GUARDED, 400, 404))
async def list_input_items(
    response_id: str,
    db: Database,
    request: Request[Any, Any, Any],
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Parameter(max_length=128)] = None,
) -> Response[bytes]:
    """The items the response was generated from: those of the chain it continues, then its own input."""
    await _visible_response(db, request, response_id)
    items = await db.call(store.conversation, response_id, own_outputs=False)
    if order == "desc":
        items.reverse()
    start = 0
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise NotFound(f"Item with id '{after}' not found.", param="after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    body = ItemList(
        data=page,
        first_id=page[0].get("id") if page else None,
        last_id=page[-1].get("id") if page else None,
        has_more=start + limit < len(items),
    )
    return Response(encoder.encode(body), media_type="application/json")


ROUTES = [create_response, get_response, delete_response, cancel_response, list_input_items]
