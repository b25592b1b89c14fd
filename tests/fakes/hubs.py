"""Stand-ins for where models come from: the Hugging Face hub, an Ollama registry and a file server.

:class:`ModelHubs` runs two loopback HTTP servers:

- ``hub_url``: the Hugging Face hub API and an Ollama registry (the real ones are two
  hosts; one server keeps the tests simple, and their paths do not overlap).
  Hugging Face: ``GET /api/models/OWNER/REPO`` and ``.../revision/REV`` (the model info:
  ``id``, ``modelId``, ``sha``, ``private``, ``gated``, ``siblings`` with ``rfilename``,
  and with ``?blobs=true`` also ``size``, ``blobId`` and for LFS files ``lfs`` =
  ``{sha256, size, pointerSize}``); ``GET|HEAD /OWNER/REPO/resolve/REV/FILE``: a 302 to
  the file server with the hub's headers (``X-Repo-Commit``, ``X-Linked-Etag`` and
  ``X-Linked-Size`` for the LFS file, ``ETag`` of the pointer). A gated repository
  answers 401 with ``X-Error-Code: GatedRepo`` unless ``Authorization: Bearer TOKEN``
  carries its token; an unknown one 401 ``RepoNotFound`` (the hub does not tell private
  from absent without a token) — 404 with a token.
  Ollama: ``GET /v2/NS/MODEL/manifests/TAG`` (``application/vnd.docker.distribution.
  manifest.v2+json``, layers with Ollama's media types, ``Docker-Content-Digest``),
  ``GET /v2/NS/MODEL/blobs/sha256:HEX``: a 307 to the file server, as the registry
  sends blobs to its CDN. Unknown: 404 with the registry's ``{"errors": [...]}``.
- ``cdn_url``: the file server. ``GET|HEAD /blobs/HEX[/NAME]`` with ``Range: bytes=N-``
  (206 and ``Content-Range``; 416 past the end), ``Accept-Ranges``, ``ETag``.

Faults, for tests: :meth:`cut_next` ends the next download of a file after some bytes
(the connection closes mid-body); :meth:`corrupt` serves a file with one byte changed;
``rate`` (bytes per second) slows every download; ``hold`` (an event) holds each
download's body until it is set. ``requests`` logs each request as
(server, method, path, headers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import gguf
import numpy as np

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def gguf_bytes(tmp: Any, *, tensor_bytes: int = 64 * 1024, seed: int = 0, arch: str = "llama") -> bytes:
    """A small valid GGUF (written under the folder ``tmp``) whose one f32 tensor has ``tensor_bytes`` bytes."""
    path = tmp / f"gen-{seed}-{tensor_bytes}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(2048)
    writer.add_file_type(0)
    writer.add_token_list([f"t{i}" for i in range(100)])
    values = np.random.default_rng(seed).random(tensor_bytes // 4, dtype=np.float32)
    writer.add_tensor("weight", values.reshape(-1, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.unlink()
    return data


def split_gguf(source: Path, folder: Path, stem: str, *, max_tensors: int = 100) -> list[Path]:
    """``source`` (a real model) rewritten by gguf-py's writer as a split GGUF in ``folder``:
    ``STEM-0000k-of-0000N.gguf``, at most ``max_tensors`` tensors a part, the metadata in the first."""
    reader = gguf.GGUFReader(source)
    architecture = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(folder / f"{stem}.gguf", architecture, split_max_tensors=max_tensors)
    for item in reader.fields.values():
        if item.name == gguf.Keys.General.ARCHITECTURE or item.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value_type = item.types[0]
        sub_type = item.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(item.name, item.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class HFRepo:
    files: dict[str, bytes]
    commit: str
    token: str | None = None  # gated: only this token may read it


@dataclass
class OllamaModel:
    layers: list[tuple[str, bytes]]  # (media type, content)
    config: bytes = b'{"model_format":"gguf","model_family":"llama"}'

    def manifest(self) -> bytes:
        def layer(media_type: str, data: bytes) -> dict[str, Any]:
            return {"mediaType": media_type, "digest": f"sha256:{sha256(data)}", "size": len(data)}

        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_V2,
                "config": layer("application/vnd.docker.container.image.v1+json", self.config),
                "layers": [layer(t, d) for t, d in self.layers],
            }
        ).encode()


@dataclass
class ModelHubs:
    repos: dict[str, HFRepo] = field(default_factory=dict)
    ollama: dict[str, OllamaModel] = field(default_factory=dict)  # "ns/model:tag"
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 hex -> bytes
    requests: list[tuple[str, str, str, dict[str, str]]] = field(default_factory=list)
    rate: int | None = None
    hold: threading.Event | None = None  # blob bodies start only once it is set
    cuts: dict[str, int] = field(default_factory=dict)
    corrupted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._hub = _Server(self, "hub")
        self._cdn = _Server(self, "cdn")
        self.hub_url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for server in (self._hub, self._cdn)
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.close_connections()
            server.server_close()

    def __enter__(self) -> ModelHubs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # What the hubs hold.

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_hf(self, repo_id: str, files: dict[str, bytes], *, token: str | None = None) -> HFRepo:
        for data in files.values():
            self.add_blob(data)
        repo = HFRepo(files, hashlib.sha1(repo_id.encode()).hexdigest(), token)
        self.repos[repo_id] = repo
        return repo

    def add_ollama(self, name: str, model: bytes, *, template: str = "{{ .Prompt }}", params: str = "{}") -> None:
        layers = [
            ("application/vnd.ollama.image.model", model),
            ("application/vnd.ollama.image.template", template.encode()),
            ("application/vnd.ollama.image.params", params.encode()),
        ]
        entry = OllamaModel(layers)
        for _, data in [*layers, ("", entry.config)]:
            self.add_blob(data)
        self.ollama[name] = entry

    def file_url(self, data: bytes, name: str = "model.gguf") -> str:
        return f"{self.cdn_url}/blobs/{self.add_blob(data)}/{name}"

    # Faults.

    def cut_next(self, data: bytes, after: int) -> None:
        """The next download of ``data`` stops after ``after`` bytes of the body: the connection closes."""
        self.cuts[sha256(data)] = after

    def corrupt(self, data: bytes) -> None:
        """Serve ``data`` with its last byte changed, under its true sha256."""
        self.corrupted.add(sha256(data))

    def downloads(self, data: bytes) -> list[dict[str, str]]:
        """The headers of each GET of ``data`` from the file server."""
        digest = sha256(data)
        return [h for (s, m, p, h) in self.requests if s == "cdn" and m == "GET" and digest in p]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hubs: ModelHubs, role: str) -> None:
        self.hubs = hubs
        self.role = role
        self.connections: set[Any] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        import socket

        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def dispatch(self, method: str) -> None:
        hubs = self.server.hubs
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        with hubs.lock:
            hubs.requests.append((self.server.role, method, path, {k.lower(): v for k, v in self.headers.items()}))
        if self.server.role == "cdn":
            if path.startswith("/blobs/"):
                self.blob(method, path.split("/")[2])
                return
        elif path.startswith("/api/models/"):
            self.model_info(path.removeprefix("/api/models/"), parse_qs(parts.query))
            return
        elif path.startswith("/v2/"):
            self.registry(path)
            return
        elif "/resolve/" in path:
            self.resolve(path)
            return
        self.send(404, b"Not Found", "text/plain")

    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

    # Hugging Face.

    def repo_for(self, repo_id: str) -> HFRepo | None:
        """The repository if this request may read it; else None after answering as the hub does."""
        repo = self.server.hubs.repos.get(repo_id)
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if repo is None:
            if token is None:
                message = "Repository not found"
                self.send_json(401, {"error": message}, {"X-Error-Code": "RepoNotFound", "X-Error-Message": message})
            else:
                self.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        if repo.token is not None and token != repo.token:
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            self.send_json(401, {"error": message}, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
            return None
        return repo

    def model_info(self, rest: str, query: dict[str, list[str]]) -> None:
        owner, _, tail = rest.partition("/")
        repo_name, _, revision = tail.partition("/revision/")
        repo_id = f"{owner}/{repo_name}"
        repo = self.repo_for(repo_id)
        if repo is None:
            return
        if revision and revision not in ("main", repo.commit):
            self.send_json(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, data in sorted(repo.files.items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                pointer = _pointer(data)
                sibling["blobId"] = _git_oid(pointer)
                sibling["size"] = len(data)
                sibling["lfs"] = {"sha256": sha256(data), "size": len(data), "pointerSize": len(pointer)}
            siblings.append(sibling)
        self.send_json(
            200,
            {
                "_id": repo.commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.token else False,
                "disabled": False,
                "tags": ["gguf"],
                "siblings": siblings,
            },
        )

    def resolve(self, path: str) -> None:
        head, _, tail = path.lstrip("/").partition("/resolve/")
        revision, _, filename = tail.partition("/")
        repo = self.repo_for(head)
        if repo is None:
            return
        if revision not in ("main", repo.commit):
            self.send_json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return
        data = repo.files.get(filename)
        if data is None:
            self.send_json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        digest = sha256(data)
        location = f"{self.server.hubs.cdn_url}/blobs/{digest}/{quote(filename.rsplit('/', 1)[-1])}?X-Amz-Expires=3600"
        body = f"Found. Redirecting to {location}".encode()
        self.send(
            302,
            body,
            "text/plain; charset=utf-8",
            {
                "Location": location,
                "X-Repo-Commit": repo.commit,
                "X-Linked-Etag": f'"{digest}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{_git_oid(_pointer(data))}"',
                "Accept-Ranges": "bytes",
            },
        )

    # Ollama registry.

    def registry(self, path: str) -> None:
        hubs = self.server.hubs
        rest = path.removeprefix("/v2/")
        if "/manifests/" in rest:
            name, _, tag = rest.partition("/manifests/")
            model = hubs.ollama.get(f"{name}:{tag}")
            if model is None:
                self.registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                return
            manifest = model.manifest()
            self.send(200, manifest, MANIFEST_V2, {"Docker-Content-Digest": f"sha256:{sha256(manifest)}"})
            return
        if "/blobs/sha256:" in rest:
            digest = rest.rpartition("/blobs/sha256:")[2]
            if digest not in hubs.blobs:
                self.registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry")
                return
            location = f"{hubs.cdn_url}/blobs/{digest}"
            self.send(307, b"", "text/plain", {"Location": location})
            return
        self.registry_error(404, "NAME_UNKNOWN", "repository name not known to registry")

    def registry_error(self, status: int, code: str, message: str) -> None:
        self.send_json(status, {"errors": [{"code": code, "message": message, "detail": None}]})

    # The file server.

    def blob(self, method: str, digest: str) -> None:
        hubs = self.server.hubs
        data = hubs.blobs.get(digest)
        if data is None:
            self.send(404, b"NoSuchKey", "application/xml")
            return
        if digest in hubs.corrupted:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        status = 200
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{digest}"'}
        requested = self.headers.get("Range")
        if requested:
            unit, _, spec = requested.partition("=")
            first, _, _ = spec.partition("-")
            if unit != "bytes" or not first.isdigit():
                self.send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                return
            start = int(first)
            if start >= len(data):
                self.send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "HEAD":
            return
        if hubs.hold is not None:
            hubs.hold.wait(timeout=30)
        with hubs.lock:
            cut = hubs.cuts.pop(digest, None) if hubs.cuts.get(digest) is not None else None
        limit = len(body) if cut is None else max(0, cut - start)
        sent = 0
        step = 16 * 1024
        while sent < limit:
            piece = body[sent : min(limit, sent + step)]
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:
                return
            sent += len(piece)
            if hubs.rate:
                time.sleep(len(piece) / hubs.rate)
        if cut is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                import socket

                self.connection.shutdown(socket.SHUT_RDWR)


def _pointer(data: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n".encode()


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class ForwardProxy:
    """A plain HTTP forward proxy (absolute-form requests, as clients send to an ``http://`` proxy):
    forwards GET and HEAD with their headers and answers what the origin answered. ``seen`` lists the
    absolute URLs it forwarded."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.forward("GET")

            def do_HEAD(self) -> None:
                self.forward("HEAD")

            def forward(self, method: str) -> None:
                import http.client

                proxy.seen.append(self.path)
                target = urlsplit(self.path)
                connection = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=30)
                path = target.path + (f"?{target.query}" if target.query else "")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
                connection.request(method, path, headers=headers)
                response = connection.getresponse()
                body = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)
                connection.close()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
