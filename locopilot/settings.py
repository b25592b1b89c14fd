"""Settings: the only reader of the environment.

Every setting is a field of :class:`Settings`, named after its environment
variable without the ``LOCOPILOT_`` prefix, and documents itself with
``Meta(description=...)``. :func:`load_settings` reads a mapping (normally
``os.environ``) into a frozen Settings or raises :class:`SettingsError` naming
the variable and what it allows. The README's settings table is generated from
these fields by :func:`settings_table` and a test keeps the two in sync.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta

PREFIX = "LOCOPILOT_"

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "text"]


Privacy = Literal["local_only", "local_preferred", "any"]
UpstreamTransport = Literal["aiohttp", "httpx"]
RoutingAffinity = Literal["prefix", "session", "off"]
PROVIDER_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
# Host names or IP literals (IPv6 in brackets), comma-separated; ports are not part of an entry.
HOST_LIST = r"^\s*([a-zA-Z0-9.-]+|\[[0-9a-fA-F:.]+\])?(\s*,\s*([a-zA-Z0-9.-]+|\[[0-9a-fA-F:.]+\]))*\s*$"
# Exact origins: scheme, host and optional port; no path, no wildcard.
ORIGIN_LIST = r"^\s*(https?://[a-zA-Z0-9.-]+(:[0-9]{1,5})?)?(\s*,\s*https?://[a-zA-Z0-9.-]+(:[0-9]{1,5})?)*\s*$"


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream provider; ``api_key`` is left out of reprs so it never reaches a log."""

    name: Annotated[str, Meta(pattern=PROVIDER_NAME)]
    url: Annotated[str, Meta(pattern=r"^https?://")]
    kind: Literal["openai", "ollama"] = "openai"
    locality: Literal["local", "remote"] = "remote"
    priority: Annotated[int, Meta(ge=-1000, le=1000)] = 50
    models: tuple[str, ...] = ()
    weight: Annotated[float, Meta(ge=0, le=1000)] = 1.0
    """Its share of its pool's traffic against the other replicas' weights; 0 takes none while another can."""
    max_concurrent: Annotated[int, Meta(ge=0, le=100_000)] = 0
    """Requests it is sent at once; 0 is no cap. One more goes to another replica, or is refused with 503."""
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)


class ModelSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One entry of ``LOCOPILOT_MODEL_SETTINGS``: what differs for the models its key matches; None keeps
    the global setting of the same name."""

    ctx_size: Annotated[int, Meta(ge=0, le=1_048_576)] | None = None
    parallel: Annotated[int, Meta(ge=0, le=64)] | None = None
    gpu_layers: Annotated[int, Meta(ge=-1, le=10_000)] | None = None
    threads: Annotated[int, Meta(ge=0, le=1024)] | None = None
    idle_ttl: Annotated[int, Meta(ge=-1)] | None = None
    keep_loaded: bool = False
    """Never unloaded for being idle, nor to make room for another model."""
    chat_template: str | None = None
    """``chatml`` or ``gemma`` (locopilot's fallbacks), or the path of a Jinja chat template file."""


class ModelRuntime(msgspec.Struct, frozen=True, kw_only=True):
    """The settings one model runs with: its ``LOCOPILOT_MODEL_SETTINGS`` entry over the global ones."""

    ctx_size: int
    parallel: int
    gpu_layers: int
    threads: int
    decode_threads: int
    idle_ttl: int
    keep_loaded: bool
    chat_template: str | None = None


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: Annotated[
        str,
        Meta(
            min_length=1,
            description="Address to listen on. Keep the loopback default unless clients on other machines need it.",
        ),
    ] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535, description="TCP port to listen on.")] = 8080
    data_dir: Annotated[
        str,
        Meta(
            description=(
                "Folder for state (the SQLite database). Default: `$STATE_DIRECTORY` under systemd, "
                "else `~/.local/share/locopilot` (`~/Library/Application Support/locopilot` on macOS)."
            )
        ),
    ] = ""
    models_dir: Annotated[
        str, Meta(description="Folder of GGUF models served by the embedded engine. Default: `<DATA_DIR>/models`.")
    ] = ""
    default_model: Annotated[
        str,
        Meta(
            pattern=r"^[a-zA-Z0-9:._-]+$",
            description="Model used by `locopilot chat` and by requests for the model `default`.",
        ),
    ] = "smollm2-135m-instruct"
    ctx_size: Annotated[
        int,
        Meta(
            ge=0,
            le=1_048_576,
            description="Context window in tokens for each loaded model; 0 uses the model's trained context length.",
        ),
    ] = 4096
    parallel: Annotated[
        int,
        Meta(
            ge=0,
            le=64,
            description=(
                "Requests each loaded model serves at once (continuous batching: one decode step advances them "
                "all). Each gets its own `LOCOPILOT_CTX_SIZE` tokens of KV cache, so memory grows with it; "
                "0 picks 4, or fewer so that all slots together hold at most 32768 tokens."
            ),
        ),
    ] = 0
    threads: Annotated[
        int,
        Meta(
            ge=0,
            le=1024,
            description=(
                "CPU threads per loaded model; 0 picks the number of CPU cores, and for a step that generates "
                "for a single request, every core or one fewer, whichever the runner measures faster while it "
                "serves (engine health says which and why). A number fixes both."
            ),
        ),
    ] = 0
    gpu_layers: Annotated[
        int,
        Meta(
            ge=-1,
            le=10_000,
            description=(
                "Layers to put on the GPUs (a GPU companion library must be found: see `LOCOPILOT_BACKENDS_DIR`); "
                "-1 puts as many as the GPUs' free memory holds with the KV cache counted (all when they fit), "
                "0 none, a number that many (more than the model has: all). Engine health says how many each "
                "loaded model got and why."
            ),
        ),
    ] = -1
    backends_dir: Annotated[
        str,
        Meta(
            description=(
                "A folder of GPU companion libraries of the engine (`libggml-vulkan.so`, `libggml-cuda.so`, from "
                "`build/gpu_backend.sh`), looked in before the binary's own folder. One that does not load (no "
                "Vulkan loader, no NVIDIA driver) or finds no device leaves the work to the CPU, with one log line."
            ),
        ),
    ] = ""
    training_python: Annotated[
        str,
        Meta(
            description=(
                "Python interpreter of an environment with Unsloth, Axolotl or MLX-LM installed, used by "
                "`locopilot train --framework` and listed by `locopilot doctor`. Default: `python3` on `PATH`. "
                "The server's training jobs may name a framework only when this is set. "
                "locopilot never imports those frameworks itself."
            )
        ),
    ] = ""
    max_loaded_models: Annotated[
        int,
        Meta(ge=1, le=64, description="Models kept loaded at once; loading one more unloads the least recently used."),
    ] = 2
    model_idle_ttl: Annotated[
        int,
        Meta(
            ge=-1,
            description="Seconds a loaded model may sit idle before it is unloaded; -1 keeps models loaded.",
        ),
    ] = 300
    queue_size: Annotated[
        int,
        Meta(
            ge=0,
            le=100_000,
            description="Requests that may wait for a busy model; one more is refused with 503 and `Retry-After`.",
        ),
    ] = 32
    max_concurrent_requests: Annotated[
        int,
        Meta(
            ge=0,
            le=1_000_000,
            description=(
                "Inference requests (chat, completions, embeddings) in flight at once, across all keys; "
                "one more is refused at once with 503 and `Retry-After`. 0 sets no cap."
            ),
        ),
    ] = 256
    default_rpm: Annotated[
        int,
        Meta(
            ge=0,
            le=10**9,
            description="Requests per minute for an API key created without `--rpm`; 0 leaves such keys unlimited.",
        ),
    ] = 0
    default_tpm: Annotated[
        int,
        Meta(
            ge=0,
            le=10**12,
            description=(
                "Tokens (prompt and completion) per minute for an API key created without `--tpm`; "
                "0 leaves such keys unlimited."
            ),
        ),
    ] = 0
    prompt_cache_mb: Annotated[
        int,
        Meta(
            ge=0,
            le=1 << 30,
            description=(
                "Megabytes of disk for prompt caches kept across restarts, idle unloads and model swaps, in "
                "`<DATA_DIR>/prompt-cache` (all models together; the least recently used go first). A runner with "
                "nothing to do writes each slot's KV cache that holds at least `LOCOPILOT_PROMPT_CACHE_MIN_TOKENS` "
                "tokens, and a prompt that begins the same way later loads it instead of decoding it. 0 turns it off."
            ),
        ),
    ] = 2048
    prompt_cache_min_tokens: Annotated[
        int,
        Meta(ge=1, le=1_048_576, description="Fewest tokens a prompt cache must hold to be kept on disk."),
    ] = 1024
    load_timeout: Annotated[
        int, Meta(ge=1, le=3600, description="Seconds a model may take to load before the request fails with 503.")
    ] = 300
    max_body_bytes: Annotated[
        int,
        Meta(ge=1024, le=1 << 30, description="Largest request body accepted, in bytes; larger bodies get 413."),
    ] = 16 * 1024 * 1024
    max_message_bytes: Annotated[
        int,
        Meta(
            ge=1024,
            le=1 << 30,
            description=(
                "Largest text of one chat message, one completion prompt or one embedding input, in bytes (UTF-8); "
                "larger is refused with 400."
            ),
        ),
    ] = 128 * 1024
    allowed_hosts: Annotated[
        str,
        Meta(
            pattern=HOST_LIST,
            description=(
                "Comma-separated host names (no port) that requests may carry in their `Host` header, besides "
                "`localhost`, `127.0.0.1` and `[::1]`; any other is refused with 403 (against DNS rebinding). "
                "Checked on a loopback bind always, on any other bind only when this is set."
            ),
        ),
    ] = ""
    cors_origins: Annotated[
        str,
        Meta(
            pattern=ORIGIN_LIST,
            description=(
                "Comma-separated exact origins (`https://app.example.com`) whose browser pages may call the API "
                "(CORS, without credentials); empty turns CORS off. No wildcards."
            ),
        ),
    ] = ""
    tls_cert: Annotated[
        str, Meta(description="A PEM certificate (chain) file: serve HTTPS instead of HTTP. Needs `LOCOPILOT_TLS_KEY`.")
    ] = ""
    tls_key: Annotated[str, Meta(description="The PEM private key file for `LOCOPILOT_TLS_CERT`.")] = ""
    log_level: Annotated[LogLevel, Meta(description="One of debug, info, warning, error.")] = "info"
    log_format: Annotated[
        LogFormat,
        Meta(
            description=(
                "How log lines on stderr are written: `json` (one object per line, for journald and log "
                "shippers), `text` (for a person at a terminal), or `auto` (text when stderr is a terminal, "
                "else JSON)."
            )
        ),
    ] = "auto"
    shutdown_grace: Annotated[
        float,
        Meta(
            ge=0,
            le=3600,
            description=(
                "Seconds requests in flight may take to finish after SIGTERM; streams still running then end "
                "with an error event. Keep it 15 s below the service manager's stop timeout."
            ),
        ),
    ] = 30.0
    log_retention_days: Annotated[
        int,
        Meta(
            ge=0,
            le=36500,
            description=(
                "Days request-log and audit rows are kept; older ones are deleted at start and hourly, "
                "in small batches. 0 keeps them forever."
            ),
        ),
    ] = 30
    responses_retention_days: Annotated[
        int,
        Meta(
            ge=0,
            le=36500,
            description=(
                "Days stored Responses API responses (`POST /v1/responses` with `store` left on) are kept, with "
                "their input and output items; older ones are deleted at start and hourly. 0 keeps them forever."
            ),
        ),
    ] = 30
    log_prompts: Annotated[
        bool,
        Meta(
            description=(
                "Store each inference request's messages, prompt or inputs and its completion text in the request "
                "log (the database's `inference_logs` rows, kept `LOCOPILOT_LOG_RETENTION_DAYS`). Off: no prompt "
                "or reply text is stored anywhere. Never written to the log lines on stderr either way."
            )
        ),
    ] = False
    routing_privacy: Annotated[
        Privacy,
        Meta(
            description=(
                "Privacy policy for requests without an `X-Routing-Privacy` header: "
                "`local_only` never uses a remote provider, `local_preferred` uses one only when no local one can "
                "serve, `any` may use any provider and tries the fastest healthy one first."
            )
        ),
    ] = "local_preferred"
    ollama_url: Annotated[
        str,
        Meta(
            extra={"kind": "URL"},
            description="An Ollama server to route to (provider `ollama`, local), e.g. `http://127.0.0.1:11434`.",
        ),
    ] = ""
    llamacpp_url: Annotated[
        str,
        Meta(
            extra={"kind": "URL"},
            description="A llama.cpp llama-server to route to (provider `llamacpp`, local), e.g. `http://127.0.0.1:8081`.",
        ),
    ] = ""
    remote_url: Annotated[
        str,
        Meta(
            extra={"kind": "URL"},
            description=(
                "An OpenAI-compatible cloud used as the fallback (provider `remote`, remote), "
                "with its `/v1`, e.g. `https://api.example.com/v1`."
            ),
        ),
    ] = ""
    remote_api_key: Annotated[
        str, Meta(extra={"kind": "secret"}, description="API key for `LOCOPILOT_REMOTE_URL`. Never printed.")
    ] = ""
    upstreams: Annotated[
        str,
        Meta(
            extra={"kind": "JSON"},
            description=(
                "Any number of upstreams as a JSON list of objects: `name`, `kind` (`openai` or `ollama`), `url`, "
                "`api_key` or `api_key_env` (the name of a variable holding it), `locality` (`local` or `remote`), "
                "`priority` (lower goes first; the embedded engine is 0), `models` (optional list), `weight` "
                "(share of its pool, default 1; 0 drains it) and `max_concurrent` (requests at once, 0 no cap). "
                "Upstreams of one locality and priority that serve the same model form a pool of replicas: "
                "each request goes to the least busy (see `LOCOPILOT_ROUTING_AFFINITY`)."
            ),
        ),
    ] = ""
    upstreams_file: Annotated[
        str,
        Meta(
            description=(
                "A JSON file with more upstreams, in the form of `LOCOPILOT_UPSTREAMS`. Read at start and again "
                "on SIGHUP: upstreams added, changed or removed there take effect without a restart, and requests "
                "in flight finish where they started. A file that does not parse on SIGHUP is logged and ignored."
            )
        ),
    ] = ""
    routing_affinity: Annotated[
        RoutingAffinity,
        Meta(
            description=(
                "Which replica of a pool a request goes to: `prefix` keeps a conversation on one replica, so "
                "its prompt cache is reused (by the `X-Session-Id` header, else the OpenAI `user` field, else a "
                "fingerprint of the leading messages up to the first user message), while that replica is not "
                "much busier than the rest; `session` does so only for requests with an `X-Session-Id` or "
                "`user`; `off` always picks the least busy replica."
            )
        ),
    ] = "prefix"
    affinity_load_factor: Annotated[
        float,
        Meta(
            ge=1.0,
            le=100,
            description=(
                "How much busier than its weighted share of the pool's requests in flight a replica may be and "
                "still take a conversation it has the cache of; over that, the conversation spills to another."
            ),
        ),
    ] = 1.25
    upstream_timeout: Annotated[
        float,
        Meta(
            ge=0.1,
            le=3600,
            description="Seconds an upstream may take to answer or to send the next bytes; then it counts as down.",
        ),
    ] = 60.0
    breaker_cooldown: Annotated[
        float,
        Meta(
            ge=0.1,
            le=3600,
            description="Seconds a provider is skipped after 3 failures in a row, before one trial request.",
        ),
    ] = 30.0
    probe_interval: Annotated[
        float, Meta(ge=0.1, le=3600, description="Seconds between health probes of each upstream (its model list).")
    ] = 15.0
    admin_key: Annotated[
        str,
        Meta(
            extra={"kind": "secret"},
            description=(
                "A bootstrap API key with every scope, for an install that must need no interactive step "
                "(at least 16 characters). Never printed."
            ),
        ),
    ] = ""
    admin_key_file: Annotated[
        str,
        Meta(
            description=(
                "A file holding the bootstrap admin key (surrounding whitespace is ignored), "
                "instead of `LOCOPILOT_ADMIN_KEY`; suits systemd credentials and secret mounts."
            )
        ),
    ] = ""
    public_models: Annotated[
        bool, Meta(description="Let `GET /v1/models` and `GET /v1/models/{id}` answer without an API key.")
    ] = False
    metrics_public: Annotated[
        bool,
        Meta(
            description=(
                "Let `GET /metrics` (Prometheus) answer without an API key; otherwise it needs the `admin` scope. "
                "It shows model and provider names, traffic and health, never keys or prompts."
            )
        ),
    ] = False
    upstream_transport: Annotated[
        UpstreamTransport,
        Meta(
            description=(
                "HTTP client under the upstream calls: `aiohttp` (faster, keeps throughput rising with concurrency) "
                "or `httpx` (httpx's own transport)."
            )
        ),
    ] = "aiohttp"
    training_concurrency: Annotated[
        int,
        Meta(
            ge=1,
            le=64,
            description=(
                "Training jobs the server runs at once, each in its own worker process; more wait in the queue. "
                "Each needs about 4 bytes per weight of the base model, plus 12 per trained weight."
            ),
        ),
    ] = 1
    max_file_bytes: Annotated[
        int,
        Meta(
            ge=1024,
            le=1 << 40,
            description=(
                "Largest file `POST /v1/files` accepts (a fine-tuning dataset), in bytes; larger is refused with "
                "413. Uploads are streamed to the data folder, never held in memory."
            ),
        ),
    ] = 256 * 1024 * 1024
    model_settings: Annotated[
        str,
        Meta(
            extra={"kind": "JSON"},
            description=(
                "Settings per model, over the global ones: a JSON object keyed by model name or glob "
                '(`{"llama3*": {"ctx_size": 8192, "parallel": 2}}`; an exact name wins, then the first glob '
                "that matches) with `ctx_size`, `parallel`, `gpu_layers`, `threads`, `idle_ttl` (seconds; -1 "
                "never), `keep_loaded` (true: never unloaded to make room or for idling) and `chat_template` "
                "(`chatml`, `gemma` or a Jinja file's path, over the model's own)."
            ),
        ),
    ] = ""
    # -- Getting models (locopilot.models.pull) --
    hf_endpoint: Annotated[
        str,
        Meta(
            pattern=r"^https?://[^\s]+$",
            description="The Hugging Face hub (or a mirror of it) that `hf.co/...` pulls list and download from.",
        ),
    ] = "https://huggingface.co"
    hf_token: Annotated[
        str,
        Meta(
            extra={"kind": "secret"},
            description="A Hugging Face access token, for gated and private repositories. Never printed.",
        ),
    ] = ""
    ollama_registry: Annotated[
        str,
        Meta(
            pattern=r"^https?://[^\s/]+/?$",
            description=(
                "The Ollama registry that pulls of names without a host (`llama3.2:1b`) use, as `https://host`; "
                "a name with a host (`registry.example.com/ns/model:tag`) goes to that host."
            ),
        ),
    ] = "https://registry.ollama.ai"
    pull_proxy: Annotated[
        str,
        Meta(
            pattern=r"^(https?://[^\s]+)?$",
            description=(
                "An HTTP proxy for pulls, and for nothing else (`http://proxy:3128`). Default: `HTTPS_PROXY` "
                "(or `https_proxy`) from the environment; hosts in `NO_PROXY` are reached directly."
            ),
        ),
    ] = ""
    model_aliases: Annotated[
        str,
        Meta(
            extra={"kind": "JSON"},
            description=(
                "Model names to serve under other names, as a JSON object: a name or a glob (`*`, `?`, `[…]`) "
                '-> the model to route to, e.g. `{"claude-*": "smollm2-135m-instruct"}` for agents that send '
                "their own model names. Applied to every API before routing; an exact name wins over a glob, "
                "globs are tried in the order given."
            ),
        ),
    ] = ""
    # Derived from the upstream settings by load_settings; not an environment variable.
    upstream_configs: tuple[UpstreamConfig, ...] = ()
    # The bootstrap admin key from ADMIN_KEY or ADMIN_KEY_FILE; derived, never printed.
    admin_secret: str = ""
    # LOCOPILOT_MODEL_SETTINGS parsed: (name or glob, its settings) in the order given; derived.
    model_overrides: tuple[tuple[str, ModelSettings], ...] = ()
    # Hosts NO_PROXY exempts from the pull proxy; derived from the environment.
    pull_no_proxy: tuple[str, ...] = ()
    # LOCOPILOT_MODEL_ALIASES as (pattern, model) pairs, exact names first; derived.
    model_alias_pairs: tuple[tuple[str, str], ...] = ()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir)

    @property
    def db_path(self) -> Path:
        return self.data_path / "locopilot.db"

    @property
    def prompt_cache_path(self) -> Path:
        return self.data_path / "prompt-cache"

    @property
    def allowed_host_names(self) -> frozenset[str]:
        """``LOCOPILOT_ALLOWED_HOSTS`` as lower-case names (IPv6 literals keep their brackets)."""
        return frozenset(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def for_model(self, name: str) -> ModelRuntime:
        """The settings model ``name`` runs with (see ``LOCOPILOT_MODEL_SETTINGS``)."""
        match = next((o for pattern, o in self.model_overrides if pattern == name), None)
        if match is None:
            match = next((o for pattern, o in self.model_overrides if fnmatch.fnmatchcase(name, pattern)), None)
        own = match or ModelSettings()
        threads = own.threads if own.threads else None
        return ModelRuntime(
            ctx_size=self.ctx_size if own.ctx_size is None else own.ctx_size,
            parallel=self.parallel if own.parallel is None else own.parallel,
            gpu_layers=self.gpu_layers if own.gpu_layers is None else own.gpu_layers,
            threads=threads or self.effective_threads(),
            # 0: the runner measures whether one thread fewer serves one-token steps faster.
            decode_threads=threads or self.threads,
            idle_ttl=-1 if own.keep_loaded else self.model_idle_ttl if own.idle_ttl is None else own.idle_ttl,
            keep_loaded=own.keep_loaded,
            chat_template=own.chat_template,
        )

    def effective_threads(self) -> int:
        return self.threads or max(1, os.cpu_count() or 1)

    def __repr__(self) -> str:
        # Settings hold API keys: a repr in a log or traceback must not show them.
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in effective_items(self)) + ")"


class SettingsError(ValueError):
    """A setting has a value it does not allow; the message names the variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass(frozen=True)
class SettingInfo:
    variable: str
    type_name: str
    default: str
    description: str


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def default_data_dir(environ: Mapping[str, str]) -> str:
    state = environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if state:
        return state.split(":")[0]
    home = Path(environ.get("HOME") or Path.home())
    if sys.platform == "darwin":
        return str(home / "Library" / "Application Support" / "locopilot")
    xdg = environ.get("XDG_DATA_HOME")
    return str(Path(xdg) / "locopilot" if xdg else home / ".local" / "share" / "locopilot")


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Read ``LOCOPILOT_*`` variables from ``environ`` into Settings.

    Raises SettingsError for an unknown ``LOCOPILOT_`` variable (a typo would
    otherwise be silently ignored) or a value a setting does not allow.
    """
    known = {info.variable for info in describe()}
    raw: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(PREFIX):
            continue
        if key not in known:
            raise SettingsError(key, f"unknown setting; known settings are {', '.join(sorted(known))}")
        field = key[len(PREFIX) :].lower()
        raw[field] = value.strip().lower() if field in ("log_level", "log_format") else value.strip()
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise _settings_error(exc) from exc
    _check_tls(settings)
    data_dir = settings.data_dir or default_data_dir(environ)
    models_dir = settings.models_dir or str(Path(data_dir) / "models")
    return msgspec.structs.replace(
        settings,
        data_dir=str(Path(data_dir).expanduser()),
        models_dir=str(Path(models_dir).expanduser()),
        upstream_configs=_upstream_configs(settings, environ),
        admin_secret=_admin_secret(settings),
        pull_proxy=settings.pull_proxy or _environment_proxy(environ),
        pull_no_proxy=_no_proxy(environ),
        model_overrides=_model_overrides(settings.model_settings),
        model_alias_pairs=_model_aliases(settings.model_aliases),
    )


def _model_overrides(text: str) -> tuple[tuple[str, ModelSettings], ...]:
    """``LOCOPILOT_MODEL_SETTINGS`` parsed; a bad entry is refused naming its model and field."""
    if not text:
        return ()
    variable = "LOCOPILOT_MODEL_SETTINGS"
    try:
        raw = msgspec.json.decode(text, type=dict[str, dict[str, Any]])
    except msgspec.DecodeError as exc:
        raise SettingsError(variable, f"{exc} (expected a JSON object of model name or glob to settings)") from exc
    parsed = []
    for pattern, values in raw.items():
        if not pattern or not re.fullmatch(r"[a-zA-Z0-9:._*?\[\]-]+", pattern):
            raise SettingsError(variable, f"{pattern!r} is not a model name or glob")
        try:
            entry = msgspec.convert(values, ModelSettings)
        except msgspec.ValidationError as exc:
            raise SettingsError(variable, f"model {pattern!r}: {exc}".replace("`$.", "`")) from exc
        template = entry.chat_template
        if template is not None and template not in ("chatml", "gemma") and not Path(template).is_file():
            raise SettingsError(
                variable, f"model {pattern!r}: chat_template {template!r} is neither chatml, gemma nor a readable file"
            )
        parsed.append((pattern, entry))
    return tuple(parsed)


def _no_proxy(environ: Mapping[str, str]) -> tuple[str, ...]:
    listed = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    return tuple(host.strip().lower() for host in listed.split(",") if host.strip())


def _environment_proxy(environ: Mapping[str, str]) -> str:
    """``HTTPS_PROXY`` (or its lower-case spelling), the proxy air-gapped sites set for the way out."""
    value = (environ.get("HTTPS_PROXY") or environ.get("https_proxy") or "").strip()
    if value and not value.startswith(("http://", "https://")):
        raise SettingsError("HTTPS_PROXY", "must be an http:// or https:// URL (used by `locopilot pull`)")
    return value


def _check_tls(settings: Settings) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        variable = "LOCOPILOT_TLS_KEY" if settings.tls_cert else "LOCOPILOT_TLS_CERT"
        raise SettingsError(variable, "set both LOCOPILOT_TLS_CERT and LOCOPILOT_TLS_KEY, or neither")
    for variable, value in (("LOCOPILOT_TLS_CERT", settings.tls_cert), ("LOCOPILOT_TLS_KEY", settings.tls_key)):
        if value and not Path(value).expanduser().is_file():
            raise SettingsError(variable, f"{value} is not a readable file")


MODEL_ALIAS = re.compile(r"^[^\s]{1,256}$")
GLOB_CHARS = frozenset("*?[")


def _model_aliases(value: str) -> tuple[tuple[str, str], ...]:
    """LOCOPILOT_MODEL_ALIASES as (name or glob, model) pairs: exact names first, then globs in order."""
    if not value:
        return ()
    variable = "LOCOPILOT_MODEL_ALIASES"
    try:
        aliases = msgspec.json.decode(value, type=dict[str, str])
    except msgspec.DecodeError as exc:
        raise SettingsError(variable, f"{exc} (expected a JSON object of model name or glob -> model name)") from exc
    for name, model in aliases.items():
        for text in (name, model):
            if not MODEL_ALIAS.match(text):
                raise SettingsError(variable, f"{text!r} is not a model name (1 to 256 characters, no spaces)")
        if GLOB_CHARS & set(model):
            raise SettingsError(variable, f"the alias {name!r} must name one model, not the pattern {model!r}")
    exact = [(name, model) for name, model in aliases.items() if not GLOB_CHARS & set(name)]
    globs = [(name, model) for name, model in aliases.items() if GLOB_CHARS & set(name)]
    return tuple(exact + globs)


MIN_ADMIN_KEY_LENGTH = 16


def _admin_secret(settings: Settings) -> str:
    """The bootstrap admin key, from the variable or the file it names; "" when neither is set."""
    if settings.admin_key and settings.admin_key_file:
        raise SettingsError("LOCOPILOT_ADMIN_KEY_FILE", "set either LOCOPILOT_ADMIN_KEY or LOCOPILOT_ADMIN_KEY_FILE")
    variable, secret = "LOCOPILOT_ADMIN_KEY", settings.admin_key
    if settings.admin_key_file:
        variable = "LOCOPILOT_ADMIN_KEY_FILE"
        path = Path(settings.admin_key_file).expanduser()
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(variable, f"cannot read {path}: {exc}") from exc
    elif not secret:
        return ""
    # The message never quotes the key: it would end up in a terminal or a journal.
    if len(secret) < MIN_ADMIN_KEY_LENGTH:
        raise SettingsError(variable, f"the admin key must be at least {MIN_ADMIN_KEY_LENGTH} characters long")
    if any(c.isspace() or not c.isprintable() for c in secret):
        raise SettingsError(variable, "the admin key must not contain spaces or control characters")
    return secret


def _upstream_configs(settings: Settings, environ: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    """The simple URL settings and LOCOPILOT_UPSTREAMS as one list; names are unique."""
    configs: list[UpstreamConfig] = []
    if settings.ollama_url:
        configs.append(UpstreamConfig("ollama", settings.ollama_url, kind="ollama", locality="local", priority=10))
    if settings.llamacpp_url:
        # llama-server is given as its root, as its docs do; its OpenAI API is under /v1.
        url = settings.llamacpp_url.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        configs.append(UpstreamConfig("llamacpp", url, locality="local", priority=20))
    if settings.remote_url:
        api_key = settings.remote_api_key or None
        configs.append(UpstreamConfig("remote", settings.remote_url, locality="remote", priority=100, api_key=api_key))
    for variable, value in (
        ("LOCOPILOT_OLLAMA_URL", settings.ollama_url),
        ("LOCOPILOT_LLAMACPP_URL", settings.llamacpp_url),
        ("LOCOPILOT_REMOTE_URL", settings.remote_url),
    ):
        if value and not value.startswith(("http://", "https://")):
            raise SettingsError(variable, "must be an http:// or https:// URL")
    listed: list[tuple[str, UpstreamConfig]] = []
    if settings.upstreams:
        listed += [("LOCOPILOT_UPSTREAMS", c) for c in _listed_upstreams("LOCOPILOT_UPSTREAMS", settings.upstreams)]
    if settings.upstreams_file:
        variable = "LOCOPILOT_UPSTREAMS_FILE"
        path = Path(settings.upstreams_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(variable, f"cannot read {path}: {exc}") from exc
        listed += [(variable, c) for c in _listed_upstreams(variable, text)]
    for variable, config in listed:
        api_key = config.api_key
        if config.api_key_env:
            if config.api_key_env not in environ:
                raise SettingsError(variable, f"upstream {config.name!r} names {config.api_key_env}, which is not set")
            api_key = environ[config.api_key_env]
        configs.append(dataclasses.replace(config, api_key=api_key))
    names = [c.name for c in configs]
    for name in names:
        if name == "embedded" or names.count(name) > 1:
            raise SettingsError(
                "LOCOPILOT_UPSTREAMS", f"the provider name {name!r} is taken; give each upstream its own"
            )
    return tuple(configs)


def _listed_upstreams(variable: str, text: str) -> list[UpstreamConfig]:
    try:
        return msgspec.json.decode(text, type=list[UpstreamConfig])
    except msgspec.DecodeError as exc:
        raise SettingsError(variable, f"{exc} (expected a JSON list of upstream objects)") from exc


def reload_upstreams(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[UpstreamConfig, ...]:
    """The upstreams as they are configured now: the environment's (which a running process cannot see
    change) and ``LOCOPILOT_UPSTREAMS_FILE``'s, read again. Raises SettingsError as at start."""
    return _upstream_configs(settings, os.environ if environ is None else environ)


def _settings_error(exc: msgspec.ValidationError) -> SettingsError:
    # msgspec reports the failing field as "at `$.name`"; map it back to the variable.
    message = str(exc)
    match = re.search(r" - at `\$\.(\w+)`$", message)
    if not match:
        return SettingsError(PREFIX + "*", message)
    field = match.group(1)
    info = {i.variable: i for i in describe()}[env_name(field)]
    detail = message[: match.start()]
    allowed = f"allowed: {info.type_name}" + (f"; default {info.default}" if info.default else "")
    return SettingsError(env_name(field), f"{detail} ({allowed})")


def describe() -> Iterator[SettingInfo]:
    """Each setting's variable, type, default and description, in definition order."""
    hints = get_type_hints(Settings, include_extras=True)
    defaults = Settings.__struct_defaults__
    for name, default in zip(Settings.__struct_fields__, defaults, strict=True):
        annotated = hints[name]
        if get_origin(annotated) is not Annotated:  # derived, not read from the environment
            continue
        base, *extras = get_args(annotated)
        meta = next((m for m in extras if isinstance(m, Meta)), None)
        if meta is None:  # derived, not read from the environment
            continue
        yield SettingInfo(
            variable=env_name(name),
            type_name=_type_name(base, meta),
            default=_text(default),
            description=meta.description or "",
        )


def _text(value: object) -> str:
    """A setting's value as it is written in the environment (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _type_name(base: Any, meta: Meta) -> str:
    if base is bool:
        return "true | false"
    if get_origin(base) is Literal:
        return " | ".join(str(a) for a in get_args(base))
    if base is float:
        return f"seconds {meta.ge}…{meta.le}"
    if base is int:
        low = "" if meta.ge is None else str(meta.ge)
        high = "" if meta.le is None else str(meta.le)
        return f"integer {low}…{high}" if low or high else "integer"
    if base is str and meta.extra and "kind" in meta.extra:
        return str(meta.extra["kind"])  # URL, secret or JSON: text that is no file's path
    return "path" if base is str and meta.pattern is None and meta.min_length is None else "text"


def settings_table() -> str:
    """The README's settings table, as Markdown."""
    lines = ["| variable | allowed | default | what it does |", "|---|---|---|---|"]
    for info in describe():
        default = f"`{info.default}`" if info.default else "(see text)"
        allowed = info.type_name.replace("|", "\\|")
        lines.append(f"| `{info.variable}` | {allowed} | {default} | {info.description} |")
    return "\n".join(lines) + "\n"


README_START = "<!-- settings:start -->\n"
README_END = "<!-- settings:end -->"


def with_settings_table(readme: str) -> str:
    """``readme`` with the text between the settings markers replaced by :func:`settings_table`."""
    head, _, rest = readme.partition(README_START)
    _, _, tail = rest.partition(README_END)
    return head + README_START + settings_table() + README_END + tail


MASK = "********"


def effective_items(settings: Settings) -> Iterator[tuple[str, str]]:
    """(variable, value) pairs for ``locopilot config``; secrets are masked."""
    for info in describe():
        name = info.variable[len(PREFIX) :].lower()
        value = _text(getattr(settings, name))
        if name in SECRET_FIELDS and value:
            value = MASK
        elif name == "upstreams" and value:
            listed = msgspec.json.decode(value)
            value = msgspec.json.encode([{**u, "api_key": MASK} if "api_key" in u else u for u in listed]).decode()
        yield info.variable, value


SECRET_FIELDS = frozenset({"remote_api_key", "admin_key", "hf_token", "pull_proxy"})
