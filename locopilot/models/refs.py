"""What ``locopilot pull REF`` accepts, parsed before any network traffic.

Three forms:

- Hugging Face: ``hf.co/OWNER/REPO[:QUANT]`` (a quantization among the repository's
  GGUF files, :data:`DEFAULT_QUANT` when none is named) or ``hf.co/OWNER/REPO/PATH.gguf``
  (one file; ``huggingface.co/`` works too). :class:`HuggingFaceRef`.
- A URL ending in ``.gguf``: ``https://host/path/FILE.gguf``. :class:`UrlRef`.
- Anything else is an Ollama registry name, parsed as Ollama parses it:
  ``[SCHEME://][HOST/][NAMESPACE/]MODEL[:TAG]`` with namespace ``library`` and tag
  ``latest`` by default. :class:`OllamaRef`.

Each ref proposes a local model name (:attr:`default_name`), which ``--name`` overrides.
Raises :class:`~locopilot.errors.InvalidRequest` (``param="model"``) for a ref that is
none of these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from locopilot.errors import InvalidRequest

DEFAULT_QUANT = "Q4_K_M"
HF_PREFIXES = ("hf.co/", "huggingface.co/")
MAX_REF = 2048

# Hugging Face repository ids: letters, digits, '-', '_', '.'; neither part starts with '.' or '-'.
_HF_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")
_QUANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# Ollama's name grammar (types/model/name.go): host, namespace, model, tag.
# A registry host: DNS labels joined by single dots, and an optional port ("embedded:.." is none).
_OLLAMA_HOST = re.compile(
    r"^(?!.{254})[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*(?::[0-9]{1,5})?$"
)
_OLLAMA_NAMESPACE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$")
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
#: ``-00001-of-00003.gguf``: one part of a split GGUF (llama.cpp's gguf-split names).
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9:._-]+")


@dataclass(frozen=True)
class HuggingFaceRef:
    owner: str
    repo: str
    quant: str | None = None
    """The quantization asked for (``hf.co/o/r:Q8_0``); None takes :data:`DEFAULT_QUANT`."""
    file: str | None = None
    """One file's path in the repository (``hf.co/o/r/model.Q8_0.gguf``)."""

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    @property
    def default_name(self) -> str:
        if self.file is not None:
            return file_stem(self.file)
        base = re.sub(r"[-_.]gguf$", "", self.repo, flags=re.IGNORECASE).lower()
        return safe_name(f"{base}:{(self.quant or DEFAULT_QUANT).lower()}")

    def __str__(self) -> str:
        tail = f"/{self.file}" if self.file else f":{self.quant}" if self.quant else ""
        return f"hf.co/{self.repo_id}{tail}"


@dataclass(frozen=True)
class OllamaRef:
    scheme: str | None
    """``http`` or ``https`` when the ref says so; None takes the registry's."""
    host: str | None
    """None: ``LOCOPILOT_OLLAMA_REGISTRY``."""
    namespace: str
    model: str
    tag: str

    @property
    def default_name(self) -> str:
        return safe_name(f"{self.model}:{self.tag}")

    def __str__(self) -> str:
        head = f"{self.scheme}://" if self.scheme else ""
        host = f"{self.host}/" if self.host else ""
        return f"{head}{host}{self.namespace}/{self.model}:{self.tag}"


@dataclass(frozen=True)
class UrlRef:
    url: str

    @property
    def default_name(self) -> str:
        return file_stem(unquote(urlsplit(self.url).path))

    def __str__(self) -> str:
        return self.url


Ref = HuggingFaceRef | OllamaRef | UrlRef


def file_stem(path: str) -> str:
    """A model name from a file path: the base name without ``.gguf`` and a split's ``-0000k-of-0000N``."""
    base = path.rsplit("/", 1)[-1]
    base = SPLIT_RE.sub("", base)
    base = re.sub(r"\.gguf$", "", base, flags=re.IGNORECASE)
    return safe_name(base)


def safe_name(text: str) -> str:
    """``text`` with what a model name cannot hold replaced by ``-``."""
    return _NAME_UNSAFE.sub("-", text).strip(".-")[:200] or "model"


def parse_ref(text: str) -> Ref:
    """The ref ``text`` names. Raises InvalidRequest naming the problem."""
    text = text.strip()
    if not text or len(text) > MAX_REF or any(c.isspace() or not c.isprintable() for c in text):
        raise _invalid(text, "give hf.co/OWNER/REPO[:QUANT], a registry name like llama3.2:1b, or an https URL")
    lowered = text.lower()
    if lowered.startswith(("http://", "https://")) and urlsplit(text).path.lower().endswith(".gguf"):
        parts = urlsplit(text)
        if not parts.hostname:
            raise _invalid(text, "the URL has no host")
        return UrlRef(text)
    for prefix in HF_PREFIXES:
        if lowered.startswith(prefix):
            return _parse_hf(text, text[len(prefix) :])
    return _parse_ollama(text)


def _parse_hf(text: str, rest: str) -> HuggingFaceRef:
    owner, _, tail = rest.partition("/")
    if "/" in tail:
        repo, _, file = tail.partition("/")
        if not file.lower().endswith(".gguf") or any(p in ("", ".", "..") for p in file.split("/")):
            raise _invalid(text, "a file in a repository is named hf.co/OWNER/REPO/FILE.gguf")
        _check_hf_ids(text, owner, repo)
        return HuggingFaceRef(owner, repo, file=file)
    repo, colon, quant = tail.partition(":")
    _check_hf_ids(text, owner, repo)
    if colon and not _QUANT.fullmatch(quant):
        raise _invalid(text, f"{quant!r} is not a quantization name (Q4_K_M, Q8_0, ...)")
    return HuggingFaceRef(owner, repo, quant=quant.upper() if colon and quant.lower() != "latest" else None)


def _check_hf_ids(text: str, owner: str, repo: str) -> None:
    for part in (owner, repo):
        if not _HF_PART.fullmatch(part) or ".." in part:
            raise _invalid(text, "expected hf.co/OWNER/REPO with letters, digits and '-_.'")


def _parse_ollama(text: str) -> OllamaRef:
    scheme: str | None = None
    rest = text
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme not in ("http", "https"):
            raise _invalid(text, f"unknown scheme {scheme!r}")
    tag = "latest"
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag = rest.rsplit(":", 1)
    parts = rest.split("/")
    if len(parts) > 3 or any(not p for p in parts):
        raise _invalid(text, "expected [HOST/][NAMESPACE/]MODEL[:TAG]")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else "library"
    host = parts[0] if len(parts) == 3 else None
    if scheme is not None and host is None:
        raise _invalid(text, "a scheme needs a host: http://HOST/NAMESPACE/MODEL:TAG")
    if host is not None and not _OLLAMA_HOST.fullmatch(host):
        raise _invalid(text, f"{host!r} is not a host name")
    if not _OLLAMA_NAMESPACE.fullmatch(namespace):
        raise _invalid(text, f"{namespace!r} is not a namespace")
    if not _OLLAMA_PART.fullmatch(model) or not _OLLAMA_PART.fullmatch(tag):
        raise _invalid(text, "model and tag use letters, digits and '-_.'")
    return OllamaRef(scheme, host, namespace, model, tag)


def _invalid(text: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"Cannot pull {text[:200]!r}: {why}", param="model", code="invalid_model_ref")
