"""Where a ref's files come from: the Hugging Face hub, an Ollama registry, or a URL.

:func:`resolve` turns a :mod:`~locopilot.models.refs` ref into a :class:`Plan`: the
files to download with the size and SHA-256 their source publishes, and metadata to
keep. It speaks the sources' own protocols over the ``httpx`` client it is given:

- Hugging Face: ``GET {endpoint}/api/models/OWNER/REPO/revision/main?blobs=true`` lists
  the repository's files (``siblings``: ``rfilename``, ``size``, ``lfs.sha256``);
  files download from ``{endpoint}/OWNER/REPO/resolve/COMMIT/FILE``, which redirects to
  a file server. ``LOCOPILOT_HF_TOKEN`` goes as ``Authorization: Bearer`` to the hub
  (httpx drops it on a redirect to another host).
- Ollama: ``GET /v2/NAMESPACE/MODEL/manifests/TAG`` (a Docker v2 manifest with Ollama's
  layer media types); the model layer is the GGUF, a blob at
  ``/v2/NAMESPACE/MODEL/blobs/sha256:HEX``. The template, system, parameters and license
  layers are small: fetched, checked against their digest and kept as metadata.
- A URL: downloaded as it is, checked against the ``--sha256`` pin.

Raises :class:`~locopilot.errors.InvalidRequest`, :class:`~locopilot.errors.NotFound`
(no such repository, file, quantization or tag) or
:class:`~locopilot.errors.UpstreamError` (the source failed or refused).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import msgspec

from locopilot.errors import ChecksumMismatch, InvalidRequest, NotFound, UpstreamError
from locopilot.models.download import Blob
from locopilot.models.refs import DEFAULT_QUANT, SPLIT_RE, HuggingFaceRef, OllamaRef, Ref, UrlRef
from locopilot.settings import Settings

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
#: Small layers kept as the model's metadata, by the name they are kept under.
OLLAMA_METADATA_LAYERS = {
    "application/vnd.ollama.image.template": "template",
    "application/vnd.ollama.image.system": "system",
    "application/vnd.ollama.image.params": "params",
    "application/vnd.ollama.image.license": "license",
}
MAX_METADATA_LAYER = 1024 * 1024
MAX_LISTING = 16 * 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_QUANT_TOKEN = re.compile(r"^(I?Q[0-9]+(?:_[A-Z0-9]+)*|BF16|F16|F32)$", re.IGNORECASE)


@dataclass(frozen=True)
class Plan:
    """What a pull fetches: ``blobs`` in order (a split model's parts first to last)."""

    source: str
    blobs: list[Blob]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int | None:
        sizes = [b.size for b in self.blobs]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


class _Lfs(msgspec.Struct):
    sha256: str
    size: int


class _Sibling(msgspec.Struct):
    rfilename: str
    size: int | None = None
    lfs: _Lfs | None = None


class _ModelInfo(msgspec.Struct):
    siblings: list[_Sibling] = []
    sha: str | None = None


class _Layer(msgspec.Struct, rename="camel"):
    media_type: str
    digest: str
    size: int


class _Manifest(msgspec.Struct, rename="camel"):
    schema_version: int
    layers: list[_Layer]


async def resolve(
    client: httpx.AsyncClient, settings: Settings, ref: Ref, *, sha256: str | None, insecure: bool
) -> Plan:
    """The plan for ``ref``; see the module docstring."""
    try:
        match ref:
            case HuggingFaceRef():
                return await _huggingface(client, settings, ref)
            case OllamaRef():
                return await _ollama(client, settings, ref, insecure)
            case UrlRef():
                return await _url(client, ref, sha256)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"Cannot reach the source of {ref}: {type(exc).__name__}: {exc}", retryable=True) from exc


# -- Hugging Face ----------------------------------------------------------------------


def quant_of(filename: str) -> str | None:
    """The quantization a GGUF's file name says (``model.Q4_K_M.gguf`` → ``Q4_K_M``), upper-case."""
    stem = SPLIT_RE.sub("", filename)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    for token in reversed(re.split(r"[-./]", stem)):
        if _QUANT_TOKEN.fullmatch(token):
            return token.upper()
    return None


def split_parts(chosen: _Sibling, files: list[_Sibling]) -> list[_Sibling]:
    """``chosen`` alone, or every part of the split GGUF it is a part of, first to last."""
    match = SPLIT_RE.search(chosen.rfilename)
    if match is None:
        return [chosen]
    prefix = chosen.rfilename[: match.start()]
    count = int(match.group(2))
    by_name = {f.rfilename: f for f in files}
    parts = []
    for index in range(1, count + 1):
        name = f"{prefix}-{index:05d}-of-{count:05d}.gguf"
        part = by_name.get(name) or next((f for f in files if f.rfilename.lower() == name.lower()), None)
        if part is None:
            raise NotFound(f"The split GGUF {prefix} is missing its part {name}", param="model")
        parts.append(part)
    return parts


def _hf_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.hf_token}"} if settings.hf_token else {}


async def _huggingface(client: httpx.AsyncClient, settings: Settings, ref: HuggingFaceRef) -> Plan:
    base = settings.hf_endpoint.rstrip("/")
    headers = _hf_headers(settings)
    response = await client.get(
        f"{base}/api/models/{ref.repo_id}/revision/main", params={"blobs": "true"}, headers=headers
    )
    if response.status_code == 404 or response.headers.get("x-error-code") == "RepoNotFound":
        # Without a token the hub answers 401 RepoNotFound for a repository that is absent or private.
        hint = "" if headers else " (or a private one: set LOCOPILOT_HF_TOKEN)"
        raise NotFound(
            f"There is no Hugging Face repository {ref.repo_id}{hint}", param="model", code="model_not_found"
        )
    if response.status_code in (401, 403):
        hint = "set LOCOPILOT_HF_TOKEN to a token that may read it" if not headers else "the token may not read it"
        raise UpstreamError(
            f"The Hugging Face repository {ref.repo_id} is gated or private: {hint}",
            retryable=False,
            upstream_status=response.status_code,
        )
    _raise_for(response, f"the listing of {ref.repo_id}")
    try:
        info = msgspec.json.decode(response.content[:MAX_LISTING], type=_ModelInfo)
    except msgspec.DecodeError as exc:
        raise UpstreamError(
            f"The hub's listing of {ref.repo_id} is not what it should be: {exc}", retryable=False
        ) from exc
    files = [s for s in info.siblings if s.rfilename.lower().endswith(".gguf")]
    if ref.file is not None:
        chosen = next((s for s in files if s.rfilename == ref.file), None)
        if chosen is None:
            raise NotFound(f"{ref.repo_id} has no file {ref.file}", param="model", code="model_not_found")
    else:
        chosen = _pick_quant(ref, files)
    revision = info.sha if info.sha and re.fullmatch(r"[0-9a-f]{40}", info.sha) else "main"
    blobs = []
    for part in split_parts(chosen, files):
        if part.lfs is None or not SHA256_RE.fullmatch(part.lfs.sha256):
            raise UpstreamError(
                f"The hub publishes no sha256 for {ref.repo_id}/{part.rfilename}; download it yourself and "
                "add it with `locopilot models add FILE --sha256 HEX`",
                retryable=False,
            )
        url = f"{base}/{ref.repo_id}/resolve/{revision}/{quote(part.rfilename)}"
        blobs.append(Blob(url, part.lfs.sha256, part.lfs.size, part.rfilename, headers))
    source = f"hf.co/{ref.repo_id}/{chosen.rfilename}"
    return Plan(source, blobs, {"revision": revision})


def _pick_quant(ref: HuggingFaceRef, files: list[_Sibling]) -> _Sibling:
    models = [f for f in files if "mmproj" not in f.rfilename.lower()]
    if not models:
        raise NotFound(f"{ref.repo_id} has no GGUF files", param="model", code="model_not_found")
    by_quant: dict[str, list[_Sibling]] = {}
    for f in models:
        by_quant.setdefault(quant_of(f.rfilename) or "?", []).append(f)
    wanted = ref.quant or DEFAULT_QUANT
    if wanted not in by_quant and ref.quant is None and len(by_quant) == 1:
        wanted = next(iter(by_quant))
    if wanted not in by_quant:
        known = ", ".join(sorted(q for q in by_quant if q != "?")) or "none named in the file names"
        asked = "asked for" if ref.quant else "the default"
        raise NotFound(
            f"{ref.repo_id} has no {wanted} GGUF ({asked}); it has: {known}. Pull one as hf.co/{ref.repo_id}:QUANT",
            param="model",
            code="model_not_found",
        )
    # Several files of one quantization: a split model's parts, or distinct models; the first by name.
    return sorted(by_quant[wanted], key=lambda f: f.rfilename)[0]


# -- Ollama registry -------------------------------------------------------------------


def registry_base(settings: Settings, ref: OllamaRef, insecure: bool) -> str:
    if ref.host is None:
        return settings.ollama_registry.rstrip("/")
    scheme = ref.scheme or "https"
    if scheme == "http" and not insecure:
        raise InvalidRequest(
            f"{ref} names a plain-http registry: allow it with insecure (`locopilot pull --insecure`)",
            param="model",
        )
    return f"{scheme}://{ref.host}"


async def _ollama(client: httpx.AsyncClient, settings: Settings, ref: OllamaRef, insecure: bool) -> Plan:
    base = registry_base(settings, ref, insecure)
    repo = f"{base}/v2/{ref.namespace}/{ref.model}"
    response = await client.get(f"{repo}/manifests/{ref.tag}", headers={"Accept": MANIFEST_V2})
    if response.status_code == 404:
        raise NotFound(f"The registry has no model {ref}", param="model", code="model_not_found")
    _raise_for(response, f"the manifest of {ref}")
    try:
        manifest = msgspec.json.decode(response.content[:MAX_LISTING], type=_Manifest)
    except msgspec.DecodeError as exc:
        raise UpstreamError(f"The manifest of {ref} is not a v2 manifest: {exc}", retryable=False) from exc
    models = [layer for layer in manifest.layers if layer.media_type == OLLAMA_MODEL_LAYER]
    if len(models) != 1:
        raise UpstreamError(f"The manifest of {ref} has {len(models)} model layers, not one", retryable=False)
    if any(layer.media_type.endswith(".adapter") for layer in manifest.layers):
        raise InvalidRequest(f"{ref} has an adapter layer, which locopilot does not apply", param="model")
    blobs = [_layer_blob(repo, models[0], f"{ref.model}:{ref.tag}")]
    metadata: dict[str, str] = {}
    for layer in manifest.layers:
        kept = OLLAMA_METADATA_LAYERS.get(layer.media_type)
        if kept is not None:
            metadata[kept] = await _small_blob(client, _layer_blob(repo, layer, kept))
    return Plan(str(ref), blobs, metadata)


def _layer_blob(repo: str, layer: _Layer, filename: str) -> Blob:
    algorithm, _, hexdigest = layer.digest.partition(":")
    if algorithm != "sha256" or not SHA256_RE.fullmatch(hexdigest):
        raise UpstreamError(f"The registry names a layer by {layer.digest!r}, not a sha256 digest", retryable=False)
    return Blob(f"{repo}/blobs/{layer.digest}", hexdigest, layer.size, filename)


async def _small_blob(client: httpx.AsyncClient, blob: Blob) -> str:
    if blob.size is None or blob.size > MAX_METADATA_LAYER:
        raise UpstreamError(f"The {blob.filename} layer is {blob.size} bytes, too large to keep", retryable=False)
    response = await client.get(blob.url)
    _raise_for(response, f"the {blob.filename} layer")
    if hashlib.sha256(response.content).hexdigest() != blob.sha256:
        raise ChecksumMismatch(f"The {blob.filename} layer does not match its digest {blob.digest}")
    return response.content.decode("utf-8", "replace")


# -- URL -------------------------------------------------------------------------------


async def _url(client: httpx.AsyncClient, ref: UrlRef, sha256: str | None) -> Plan:
    size: int | None = None
    response = await client.head(ref.url, headers={"Accept-Encoding": "identity"})
    if response.status_code == 404:
        raise NotFound(f"{ref.url} does not exist (404)", param="model", code="model_not_found")
    if response.status_code in (401, 403):
        _raise_for(response, ref.url)
    # A server that answers HEAD badly (405, say) still gets its GET; the size is then learnt from it.
    length = response.headers.get("content-length") if response.is_success else None
    if length is not None and length.isdigit():
        size = int(length)
    filename = ref.url.rsplit("/", 1)[-1].split("?", 1)[0]
    return Plan(ref.url, [Blob(ref.url, sha256, size, filename)])


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    status = response.status_code
    raise UpstreamError(
        f"{response.request.url.host} answered {status} for {what}",
        retryable=status >= 500 or status == 429,
        upstream_status=status,
    )
