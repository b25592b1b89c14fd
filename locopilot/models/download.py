"""One file downloaded safely: resumed, hashed while written, kept only when it is what was published.

:func:`fetch` writes ``Blob.url`` into a ``.partial`` file, asking with ``Range`` for
what is missing when the file already holds a prefix (from a cut connection, a
cancelled pull or a crash); the SHA-256 covers the prefix and every byte written
after it. When the bytes are all there and the hash (and size) match the blob, the
file is renamed to its final name; on a mismatch the partial file is deleted, so a
corrupt download leaves nothing behind. A cut connection is retried from where it
stopped, :data:`RETRIES` times without progress before the pull fails (the partial
file stays for the next pull). An ``flock`` on the partial file keeps two processes
(the server and a CLI) from writing it at once: the second waits, then finds the
file complete.

Raises :class:`~locopilot.errors.UpstreamError` (the source failed or refused),
:class:`~locopilot.errors.ChecksumMismatch` and
:class:`~locopilot.errors.InsufficientStorage` (``ENOSPC``; the partial file is removed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
import httpx

from locopilot.errors import ChecksumMismatch, InsufficientStorage, UpstreamError

log = logging.getLogger(__name__)

RETRIES = 5
CHUNK = 1024 * 1024
LOCK_POLL_S = 0.5


@dataclass(frozen=True)
class Blob:
    """One file to download. ``sha256`` (hex) None only for an unpinned URL (``--insecure-no-checksum``)."""

    url: str
    sha256: str | None
    size: int | None
    filename: str
    headers: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        """The name its files have under the downloads folder: its hash, or the URL's hash."""
        if self.sha256:
            return f"sha256-{self.sha256}"
        return "url-" + hashlib.sha256(self.url.encode()).hexdigest()

    @property
    def digest(self) -> str:
        """Ollama's way to name it in progress: ``sha256:<hex>``."""
        return f"sha256:{self.sha256}" if self.sha256 else self.key


def sha256_file(path: Path) -> str:
    """The SHA-256 of the file at ``path``, hex. Blocks: call it in a worker thread from async code."""
    with path.open("rb") as file:
        return _hash_prefix(file, os.fstat(file.fileno()).st_size).hexdigest()


def _hash_prefix(file: BinaryIO, length: int) -> hashlib._Hash:
    hasher = hashlib.sha256()
    file.seek(0)
    left = length
    while left > 0:
        chunk = file.read(min(CHUNK, left))
        if not chunk:
            break
        hasher.update(chunk)
        left -= len(chunk)
    file.seek(length)
    return hasher


def _write(file: BinaryIO, data: bytes) -> None:
    file.write(data)


def _finish(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())


async def _lock(file: BinaryIO, waiting: Callable[[], None]) -> None:
    """Hold an exclusive flock on ``file``, waiting (and saying so once) while another process has it."""
    told = False
    while True:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not told:
                waiting()
                told = True
            await anyio.sleep(LOCK_POLL_S)


async def fetch(
    client: httpx.AsyncClient,
    blob: Blob,
    partial: Path,
    final: Path,
    progress: Callable[[int, int | None], None],
    waiting: Callable[[], None] = lambda: None,
) -> None:
    """Download ``blob`` to ``final`` through ``partial`` (both in one folder); see the module docstring.

    ``progress(completed, total)`` is called as bytes arrive (``total`` None while unknown).
    Cancelling leaves ``partial`` in place for a later resume.
    """
    file = await anyio.to_thread.run_sync(_open_partial, partial)
    with file:
        await _lock(file, waiting)
        if await anyio.to_thread.run_sync(final.exists):  # another process finished it while we waited
            await anyio.to_thread.run_sync(partial.unlink, True)
            return
        try:
            await _fetch_locked(client, blob, file, progress)
        except (InsufficientStorage, ChecksumMismatch):
            await anyio.to_thread.run_sync(partial.unlink, True)
            raise
        await anyio.to_thread.run_sync(partial.rename, final)


def _open_partial(partial: Path) -> BinaryIO:
    partial.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return open(partial, "a+b")  # the caller closes it


async def _fetch_locked(
    client: httpx.AsyncClient, blob: Blob, file: BinaryIO, progress: Callable[[int, int | None], None]
) -> None:
    have = os.fstat(file.fileno()).st_size
    if blob.size is not None and have > blob.size:
        file.truncate(0)
        have = 0
    hasher = await anyio.to_thread.run_sync(_hash_prefix, file, have)
    total = blob.size
    progress(have, total)
    failures = 0
    while total is None or have < total:
        headers = {**blob.headers, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        before = have
        pending = bytearray()
        try:
            async with client.stream("GET", blob.url, headers=headers) as response:
                if have and response.status_code == 416 and total is not None and have == total:
                    break
                if response.status_code == 200 and have:
                    # The server ignored Range: start again from the first byte.
                    log.info("%s: the server does not resume; downloading from the start", blob.filename)
                    file.truncate(0)
                    file.seek(0)
                    have = 0
                    hasher = hashlib.sha256()
                elif response.status_code == 206:
                    start = _range_start(response.headers.get("content-range", ""))
                    if start != have:
                        raise UpstreamError(
                            f"{blob.filename}: asked for bytes from {have}, the server sent from {start}",
                            retryable=False,
                        )
                elif response.status_code != 200:
                    raise _refused(blob, response)
                if total is None:
                    total = _length(response, have)
                    progress(have, total)
                if total is not None and blob.size is None and have > total:
                    raise ChecksumMismatch(f"{blob.filename}: the partial download is longer than the file")
                async for chunk in response.aiter_raw():
                    pending += chunk
                    hasher.update(chunk)
                    have += len(chunk)
                    if total is not None and have > total:
                        raise ChecksumMismatch(f"{blob.filename}: the server sent more than its {total} bytes")
                    if len(pending) >= CHUNK:
                        await _flush(file, pending)
                    progress(have, total)
                await _flush(file, pending)
                if total is None:
                    total = have
        except httpx.TransportError as exc:
            await _flush(file, pending)  # what arrived before the cut is hashed and counted: keep it
            if have == before:
                failures += 1
            else:
                failures = 0
            if failures >= RETRIES:
                raise UpstreamError(
                    f"{blob.filename}: the download failed {RETRIES} times without progress ({type(exc).__name__}: "
                    f"{exc}); pull again to resume from byte {have}",
                    retryable=True,
                ) from exc
            log.warning("%s: %s at byte %d; resuming", blob.filename, type(exc).__name__, have)
            await anyio.sleep(min(0.2 * 2**failures, 5.0))
            continue
        except BaseException:
            # Cancelled (or failed): what arrived is hashed and counted; written, a later pull resumes after it.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await _flush(file, pending)
                await anyio.to_thread.run_sync(file.flush)
            raise
    await anyio.to_thread.run_sync(_finish, file)
    got = hasher.hexdigest()
    if blob.size is not None and have != blob.size:
        raise ChecksumMismatch(f"{blob.filename}: {have} bytes arrived, the source publishes {blob.size}")
    if blob.sha256 is not None and got != blob.sha256:
        raise ChecksumMismatch(
            f"{blob.filename}: sha256 {got} is not the published {blob.sha256}; the download was deleted"
        )


async def _flush(file: BinaryIO, pending: bytearray) -> None:
    if not pending:
        return
    data = bytes(pending)
    pending.clear()
    try:
        await anyio.to_thread.run_sync(_write, file, data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(f"The disk is full: {exc.strerror}; the partial download was removed") from exc
        raise


def _range_start(content_range: str) -> int | None:
    # "bytes 100-199/200"
    unit, _, rest = content_range.partition(" ")
    start, _, _ = rest.partition("-")
    return int(start) if unit == "bytes" and start.isdigit() else None


def _length(response: httpx.Response, have: int) -> int | None:
    if response.status_code == 206:
        _, _, size = response.headers.get("content-range", "").rpartition("/")
        return int(size) if size.isdigit() else None
    length = response.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


def _refused(blob: Blob, response: httpx.Response) -> UpstreamError:
    status = response.status_code
    hint = " (a gated or private file: set LOCOPILOT_HF_TOKEN)" if status in (401, 403) else ""
    return UpstreamError(
        f"{blob.filename}: {response.request.url.host} answered {status}{hint}",
        retryable=status >= 500 or status == 429,
        upstream_status=status,
    )
