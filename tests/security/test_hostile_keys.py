"""Bearer values shaped to break a lookup: SQL, sizes, odd bytes. Each is a plain 401."""

from __future__ import annotations

import re
from collections.abc import Mapping

import httpx
import pytest

from tests.conftest import Server
from tests.security.conftest import ADMIN, assert_unauthorized

SQL_ERROR = re.compile(r"sql|sqlite|syntax|apsw|no such|unrecognized token|traceback", re.IGNORECASE)

INJECTIONS = [
    "' OR '1'='1",
    "' OR 1=1 --",
    "lcp_' OR ''='",
    '" OR ""="',
    "x'; DROP TABLE api_keys; --",
    "x'); DELETE FROM api_keys; --",
    "' UNION SELECT hash, id, name FROM api_keys --",
    "%' OR hash LIKE '%",
    "*",
    "%",
    "lcp_%",
    "\\",
    "'",
    "1; ATTACH DATABASE '/tmp/x' AS x; --",
]


def get_models(server: Server, headers: Mapping[str, str] | Mapping[bytes, bytes]) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)


def assert_plain_401(response: httpx.Response) -> None:
    assert_unauthorized(response)
    assert not SQL_ERROR.search(response.text), response.text
    assert response.json()["error"]["message"] in (
        "Invalid API key.",
        "The Authorization header must be 'Bearer <API key>'.",
    )


@pytest.mark.parametrize("value", INJECTIONS)
def test_sql_shaped_keys_are_401(secured: Server, value: str) -> None:
    assert_plain_401(get_models(secured, {"Authorization": f"Bearer {value}"}))
    assert_plain_401(get_models(secured, {"x-api-key": value}))


def test_the_keys_table_survives(secured: Server) -> None:
    for value in INJECTIONS:
        get_models(secured, {"Authorization": f"Bearer {value}"})
    listed = httpx.get(f"{secured.url}/v1/admin/keys", headers=ADMIN, timeout=10)
    assert listed.status_code == 200
    assert httpx.get(f"{secured.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("size", [64, 513, 4096, 7000])
def test_oversized_keys_are_401(secured: Server, size: int) -> None:
    assert_plain_401(get_models(secured, {"Authorization": "Bearer " + "A" * size}))
    assert_plain_401(get_models(secured, {"x-api-key": "lcp_" + "B" * size}))


def test_a_huge_header_never_reaches_a_handler(secured: Server) -> None:
    """Past the HTTP server's header limit the request is refused before the app; never a 2xx or 5xx."""
    response = get_models(secured, {"Authorization": "Bearer " + "C" * 200_000})
    assert 400 <= response.status_code < 500
    assert not SQL_ERROR.search(response.text)
    assert httpx.get(f"{secured.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"Bearer \xff\xfe\xfd", b"Bearer lcp_\xc3\xa9t\xc3\xa9", b"Bearer a b c", b"Bearer \tlcp_x"],
)
def test_odd_bytes_are_401(secured: Server, raw: bytes) -> None:
    assert_plain_401(get_models(secured, {b"Authorization": raw}))


def test_many_authorization_headers_are_401(secured: Server) -> None:
    response = httpx.get(
        f"{secured.url}/v1/models",
        headers=[("Authorization", "Bearer wrong"), ("Authorization", "Bearer also-wrong")],
        timeout=10,
    )
    assert_plain_401(response)
