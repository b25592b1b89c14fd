"""Pull: one implementation behind ``locopilot pull``, ``POST /v1/locopilot/models/pull`` and ``POST /api/pull``.

:func:`prepare` checks a request before any work (the ref's form, the model name, the
pin a URL needs) and raises :class:`~locopilot.errors.InvalidRequest`.
:meth:`Puller.pull` then runs it as an async generator of :class:`PullEvent`, in
Ollama's vocabulary (``pulling manifest``, ``pulling <digest>`` with ``total`` and
``completed``, ``verifying sha256 digest``, ``writing manifest``, ``success``) plus
``bytes_per_second`` and ``eta_seconds``; :meth:`PullEvent.ollama` is the NDJSON line
Ollama's ``/api/pull`` sends. Errors are raised from the generator as
:class:`~locopilot.errors.LocopilotError` subclasses; the first one can only come
after the first event.

Safety: each file downloads into ``<models>/.downloads/<sha256>.partial``
(:mod:`locopilot.models.download`: resumed, hashed while written, deleted on a
mismatch) and appears in the models folder only by a rename once verified and read
as a GGUF. Free disk space is checked before a byte is fetched. Downloads are shared:
a second pull of the same file (in this process) watches the first one's transfer,
which runs in the Puller's task group; when the last pull watching a transfer goes
away (a client disconnects, Ctrl-C), the transfer is cancelled and its partial file
kept for a resume. A model that exists is refused (409) unless it came from the same
source (then the pull updates it, or does nothing when its sha256 is unchanged).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import httpx
import msgspec

from locopilot import __version__
from locopilot.errors import (
    Conflict,
    InsufficientStorage,
    InvalidModelName,
    InvalidRequest,
    LocopilotError,
    UpstreamError,
)
from locopilot.models.catalog import SUFFIX, ModelCatalog, validate_model_name
from locopilot.models.download import Blob, fetch, sha256_file
from locopilot.models.gguf import GGUFError, read_header
from locopilot.models.refs import Ref, UrlRef, parse_ref
from locopilot.models.sources import SHA256_RE, Plan, resolve
from locopilot.settings import Settings
from locopilot.store import models as records
from locopilot.store.db import Database
from locopilot.store.models import FilePart, ModelRecord

log = logging.getLogger(__name__)

DOWNLOADS = ".downloads"
PROGRESS_INTERVAL_S = 0.25
RATE_WINDOW_S = 5.0


class PullEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step of a pull. ``digest`` (``sha256:<hex>``), ``total`` and ``completed`` (bytes) on
    ``pulling <digest>`` events; ``model`` (the local name) on ``success``."""

    status: str
    digest: str | None = None
    file: str | None = None
    total: int | None = None
    completed: int | None = None
    bytes_per_second: float | None = None
    eta_seconds: float | None = None
    model: str | None = None

    def ollama(self) -> OllamaProgress:
        """This event as a line of Ollama's ``/api/pull`` stream."""
        return OllamaProgress(self.status, self.digest, self.total, self.completed)


class OllamaProgress(msgspec.Struct, omit_defaults=True):
    """Ollama's ``ProgressResponse``: ``{"status"}`` or ``{"status", "digest", "total", "completed"}``."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


@dataclass(frozen=True)
class PullRequest:
    ref: Ref
    name: str
    sha256: str | None = None
    insecure: bool = False
    """A registry named with ``http://`` may be used."""
    no_checksum: bool = False
    """A URL may be taken without a ``sha256`` pin."""


def prepare(
    text: str,
    *,
    name: str | None = None,
    sha256: str | None = None,
    insecure: bool = False,
    no_checksum: bool = False,
) -> PullRequest:
    """Check a pull before any work. Raises InvalidRequest (``param`` names the field) or InvalidModelName.

    ``sha256`` pins a URL's file (and is refused for other refs, whose sources publish
    their own); ``no_checksum`` lets a URL go unpinned; ``insecure`` lets a registry be plain http.
    """
    ref = parse_ref(text)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_RE.fullmatch(sha256):
            raise InvalidRequest("sha256 must be 64 hexadecimal digits", param="sha256")
        if not isinstance(ref, UrlRef):
            raise InvalidRequest("sha256 pins a URL; hubs and registries publish their own", param="sha256")
    elif isinstance(ref, UrlRef) and not no_checksum:
        raise InvalidRequest(
            "A URL needs its sha256 (`--sha256 HEX`), or `--insecure-no-checksum` to take it unchecked",
            param="sha256",
        )
    try:
        local = validate_model_name(name or ref.default_name)
    except InvalidModelName as exc:
        raise InvalidModelName(exc.message, param="name" if name else "model") from exc
    return PullRequest(ref, local, sha256, insecure, no_checksum)


def pull_client(settings: Settings) -> httpx.AsyncClient:
    """The HTTP client of pulls: redirects followed, the pull proxy and nothing from the environment."""
    mounts: dict[str, httpx.AsyncBaseTransport | None] | None = None
    if settings.pull_proxy and "*" not in settings.pull_no_proxy:
        mounts = {"all://": httpx.AsyncHTTPTransport(proxy=settings.pull_proxy)}
        for host in settings.pull_no_proxy:
            host = host.lstrip(".")
            mounts[f"all://{host}"] = None
            mounts[f"all://*.{host}"] = None
    return httpx.AsyncClient(
        follow_redirects=True,
        trust_env=False,
        mounts=mounts,
        timeout=httpx.Timeout(60.0, connect=15.0),
        headers={"User-Agent": f"locopilot/{__version__}"},
    )


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class _Transfer:
    """One file being downloaded, watched by every pull that needs it."""

    blob: Blob
    final: Path
    completed: int = 0
    total: int | None = None
    waiting: bool = False
    watchers: int = 0
    error: BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def progress(self, completed: int, total: int | None, now: float) -> None:
        self.completed, self.total = completed, total
        self.samples.append((now, completed))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def event(self, now: float) -> PullEvent:
        rate = eta = None
        if len(self.samples) >= 2:
            (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
            if t1 > t0:
                rate = round((c1 - c0) / (t1 - t0), 1)
                if self.total is not None and rate > 0:
                    eta = round((self.total - self.completed) / rate, 1)
        blob = self.blob
        status = f"waiting for another download of {blob.filename}" if self.waiting else _pulling(blob)
        return PullEvent(
            status=status,
            digest=blob.digest,
            file=blob.filename,
            total=self.total,
            completed=self.completed,
            bytes_per_second=rate,
            eta_seconds=eta,
        )


class Puller:
    """Pulls into ``catalog``'s folder and records arrivals in ``db``; transfers run in ``tasks``.

    ``disk_free`` and ``clock`` are seams for tests.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: ModelCatalog,
        db: Database,
        tasks: anyio.abc.TaskGroup,
        *,
        disk_free: Callable[[Path], int] = disk_free,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.db = db
        self.tasks = tasks
        self.disk_free = disk_free
        self.clock = clock
        self.transfers: dict[str, _Transfer] = {}
        self._install = anyio.Lock()
        self._space = anyio.Lock()
        # Blob key -> (its size, how many pulls under way count on it): the disk space promised to them.
        self._promised: dict[str, tuple[int, int]] = {}

    @property
    def downloads(self) -> Path:
        return self.catalog.models_dir / DOWNLOADS

    def active(self) -> list[PullEvent]:
        """The transfers under way, as progress events."""
        now = self.clock()
        return [t.event(now) for t in self.transfers.values()]

    async def pull(self, request: PullRequest) -> AsyncGenerator[PullEvent, None]:
        """Run ``request`` (from :func:`prepare`); see the module docstring. Closing the generator
        early stops watching (and cancels a transfer nobody else watches)."""
        yield PullEvent(status="pulling manifest")
        async with pull_client(self.settings) as client:
            plan = await resolve(client, self.settings, request.ref, sha256=request.sha256, insecure=request.insecure)
        if await self._installed(request.name, plan):
            yield PullEvent(status="success", model=request.name)
            return
        # One check at a time, each counting what the pulls that passed before it will still write:
        # two pulls that each fit alone but not together are not both started, to fail when the disk fills.
        async with self._space:
            await anyio.to_thread.run_sync(self._check_space, plan, dict(self._promised))
            self._promise(plan, 1)
        held = True
        try:
            for blob in plan.blobs:
                # Under the install lock: a pull of the same model that finished meanwhile has placed and
                # recorded it (and moved its download away), so this one must not start the download again.
                async with self._install:
                    if await self._installed(request.name, plan):
                        yield PullEvent(status="success", model=request.name)
                        return
                    downloading = self._download(blob)
                    first = await anext(downloading)
                try:
                    yield first
                    async for event in downloading:
                        yield event
                finally:
                    await downloading.aclose()  # a pull closed early stops watching (see _download)
            yield PullEvent(status="verifying sha256 digest")
            # Checked and placed under the install lock: two pulls that shared one download both get
            # here, and the first to place the file moves it out of the downloads folder.
            async with self._install:
                if not await self._installed(request.name, plan):
                    finals = [self._final(blob) for blob in plan.blobs]
                    try:
                        await anyio.to_thread.run_sync(read_header, finals[0])
                    except (GGUFError, OSError) as exc:
                        for path in finals:
                            path.unlink(missing_ok=True)
                        raise UpstreamError(
                            f"{plan.blobs[0].filename} is not a usable GGUF file ({exc}); it was deleted",
                            retryable=False,
                        ) from exc
                    await anyio.to_thread.run_sync(self._place, request, plan)
                # Placed: it takes no more space than it has, and must not count as still to come.
                self._promise(plan, -1)
                held = False
            yield PullEvent(status="writing manifest")
            yield PullEvent(status="success", model=request.name)
        finally:
            if held:
                self._promise(plan, -1)

    def _final(self, blob: Blob) -> Path:
        return self.downloads / f"{blob.key}{SUFFIX}"

    async def _installed(self, name: str, plan: Plan) -> bool:
        """True if ``name`` is already this plan's model; raises Conflict if it is another."""
        path = self.catalog.path_for(name)
        if not (path.is_symlink() or path.exists()):
            return False
        record = await self.db.call(records.get, name)
        if record is None or record.source != plan.source:
            came = f"from {record.source}" if record else "added by hand"
            raise Conflict(
                f"The model '{name}' exists ({came}); delete it or pull under another name",
                param="name",
                code="model_exists",
            )
        first = plan.blobs[0]
        return first.sha256 is not None and record.sha256 == first.sha256

    def _promise(self, plan: Plan, change: int) -> None:
        for blob in plan.blobs:
            if blob.size is None:
                continue
            _, pulls = self._promised.get(blob.key, (blob.size, 0))
            if pulls + change > 0:
                self._promised[blob.key] = (blob.size, pulls + change)
            else:
                self._promised.pop(blob.key, None)

    def _to_come(self, key: str, size: int) -> int:
        """The bytes blob ``key`` of ``size`` still needs on disk (none once downloaded)."""
        if (self.downloads / f"{key}{SUFFIX}").exists():
            return 0
        partial = self.downloads / f"{key}.partial"
        try:
            have = partial.stat().st_size
        except FileNotFoundError:
            have = 0
        return max(0, size - have)

    def _check_space(self, plan: Plan, promised: dict[str, tuple[int, int]]) -> None:
        """Raise InsufficientStorage unless the disk holds what ``plan`` still needs, besides what the
        downloads ``promised`` to other pulls (blob key -> (size, pulls)) will still write."""
        self.downloads.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = {blob.key for blob in plan.blobs}
        needed = sum(self._to_come(blob.key, blob.size) for blob in plan.blobs if blob.size is not None)
        coming = sum(self._to_come(key, size) for key, (size, _) in promised.items() if key not in keys)
        free = self.disk_free(self.downloads)
        if needed + coming > free:
            others = f", {coming:,} of them promised to other pulls under way" if coming else ""
            raise InsufficientStorage(
                f"Pulling needs {needed:,} more bytes in {self.catalog.models_dir}, which has {free:,} free{others}",
            )

    async def _download(self, blob: Blob) -> AsyncGenerator[PullEvent, None]:
        final = self._final(blob)
        transfer = self.transfers.get(blob.key)
        if transfer is None:
            if final.exists():
                size = final.stat().st_size
                yield PullEvent(status=_pulling(blob), digest=blob.digest, total=size, completed=size)
                return
            transfer = _Transfer(blob, final, total=blob.size)
            self.transfers[blob.key] = transfer
            self.tasks.start_soon(self._run, transfer, name=f"pull:{blob.key}")
        transfer.watchers += 1
        try:
            while not transfer.done.is_set():
                yield transfer.event(self.clock())
                with anyio.move_on_after(PROGRESS_INTERVAL_S):
                    await transfer.done.wait()
            if transfer.error is not None:
                raise transfer.error
            yield transfer.event(self.clock())
        finally:
            transfer.watchers -= 1
            if transfer.watchers == 0 and not transfer.done.is_set():
                log.info("pull of %s cancelled: nobody waits for it", blob.filename)
                transfer.scope.cancel()

    async def _run(self, transfer: _Transfer) -> None:
        blob = transfer.blob
        partial = self.downloads / f"{blob.key}.partial"
        try:
            with transfer.scope:
                async with pull_client(self.settings) as client:

                    def waiting() -> None:
                        transfer.waiting = True

                    def progress(completed: int, total: int | None) -> None:
                        transfer.waiting = False
                        transfer.progress(completed, total, self.clock())

                    await fetch(client, blob, partial, transfer.final, progress, waiting)
            if transfer.scope.cancelled_caught:
                transfer.error = LocopilotError(f"The download of {blob.filename} was cancelled")
        except LocopilotError as exc:
            transfer.error = exc
        except httpx.HTTPError as exc:
            transfer.error = UpstreamError(f"{blob.filename}: {type(exc).__name__}: {exc}", retryable=True)
        except OSError as exc:
            transfer.error = LocopilotError(f"{blob.filename}: cannot write the download: {exc}")
        finally:
            del self.transfers[blob.key]
            transfer.done.set()

    def _place(self, request: PullRequest, plan: Plan) -> None:
        """Move the verified downloads into the folder as model ``request.name`` and record it."""
        name = request.name
        target = self.catalog.path_for(name)
        finals = [self._final(blob) for blob in plan.blobs]
        if len(finals) == 1:
            os.replace(finals[0], target)
        else:
            # llama.cpp finds a split model's other parts by the first part's name: they keep their names,
            # together in a folder of their own, and the model is a link to the first part.
            folder = Path(tempfile.mkdtemp(dir=self.catalog.models_dir, prefix=f".{target.name}.", suffix=".parts"))
            for blob, path in zip(plan.blobs, finals, strict=True):
                os.replace(path, folder / blob.filename.rsplit("/", 1)[-1])
            self.catalog.place_split(folder, plan.blobs[0].filename.rsplit("/", 1)[-1], target)
        size = sum(blob.size or target.stat().st_size for blob in plan.blobs)
        records.put(
            self.db,
            ModelRecord(
                name=name,
                source=plan.source,
                sha256=plan.blobs[0].sha256 or sha256_file(target),
                size=size,
                files=[FilePart(b.filename, b.sha256, b.size or 0) for b in plan.blobs] if len(finals) > 1 else [],
                metadata=plan.metadata,
                pinned=request.sha256 is not None,
                arrived_at=time.time(),
            ),
        )
        log.info("pulled %s as model %s (%d bytes)", plan.source, name, size, extra={"event": "model_pulled"})


def _pulling(blob: Blob) -> str:
    return f"pulling {blob.digest.removeprefix('sha256:')[:12]}"


async def ollama_progress(
    puller: Puller, model: str, *, insecure: bool = False
) -> AsyncGenerator[OllamaProgress, None]:
    """Ollama's ``POST /api/pull`` stream for ``model``: one :class:`OllamaProgress` per line.

    :func:`prepare` runs before the first line, so a bad name raises InvalidRequest (or
    InvalidModelName) before anything is sent; later failures raise LocopilotError from the
    iteration, which the Ollama front writes as an ``{"error": "..."}`` line as Ollama does.
    The model's local name is the ref's default (``llama3.2:1b`` stays ``llama3.2:1b``).
    """
    request = prepare(model, insecure=insecure)
    events = puller.pull(request)
    try:
        async for event in events:
            yield event.ollama()
    finally:
        await events.aclose()
