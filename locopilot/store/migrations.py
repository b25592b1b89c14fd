"""The schema, as an ordered list of small migrations keyed by ``PRAGMA user_version``.

``MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``. Append new steps;
never edit or reorder a released one, since databases in the field have already run it.
Tables are STRICT, so a value of the wrong type is refused rather than stored.
"""

from __future__ import annotations

from collections.abc import Callable

import apsw

from locopilot.store.db import StoreError, write_transaction


def _create_inference_logs_and_training_jobs(conn: apsw.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE inference_logs (
            id          INTEGER PRIMARY KEY,
            request_id  TEXT NOT NULL,
            key_id      TEXT,
            endpoint    TEXT NOT NULL,
            model       TEXT NOT NULL,
            provider    TEXT NOT NULL,
            tokens_in   INTEGER NOT NULL,
            tokens_out  INTEGER NOT NULL,
            latency_ms  REAL NOT NULL,
            ttfb_ms     REAL,
            status      TEXT NOT NULL CHECK (status IN ('ok', 'error', 'cancelled')),
            http_status INTEGER NOT NULL,
            error       TEXT,
            created_at  REAL NOT NULL  -- unix seconds
        ) STRICT;
        CREATE INDEX inference_logs_created_at ON inference_logs (created_at);
        CREATE INDEX inference_logs_model_created_at ON inference_logs (model, created_at);
        -- A client reporting a problem quotes its request id; find it without a full scan.
        CREATE INDEX inference_logs_request_id ON inference_logs (request_id);

        CREATE TABLE training_jobs (
            id           TEXT PRIMARY KEY,
            status       TEXT NOT NULL
                         CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            base_model   TEXT NOT NULL,
            dataset_path TEXT NOT NULL,
            params       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(params)),
            output_model TEXT,
            error        TEXT,
            progress     REAL NOT NULL DEFAULT 0,
            created_at   REAL NOT NULL,  -- unix seconds, as are started_at and finished_at
            started_at   REAL,
            finished_at  REAL
        ) STRICT;
        """
    )


def _add_routing_decisions(conn: apsw.Connection) -> None:
    # The routing decision (policy, candidates, skipped and failed providers, chosen) as JSON.
    conn.execute("ALTER TABLE inference_logs ADD COLUMN routing TEXT CHECK (routing IS NULL OR json_valid(routing))")


def _add_cached_tokens(conn: apsw.Connection) -> None:
    # Prompt tokens the provider's prompt cache supplied (usage.prompt_tokens_details.cached_tokens).
    conn.execute("ALTER TABLE inference_logs ADD COLUMN tokens_cached INTEGER NOT NULL DEFAULT 0")


def _create_api_keys_and_audit_events(conn: apsw.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE api_keys (
            id           TEXT PRIMARY KEY,
            name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            -- SHA-256 of the secret, hex; the secret itself is never stored.
            hash         TEXT NOT NULL UNIQUE CHECK (length(hash) = 64),
            prefix       TEXT NOT NULL,  -- the secret's first characters, to recognise it in a list
            scopes       TEXT NOT NULL CHECK (json_valid(scopes)),
            models       TEXT CHECK (models IS NULL OR json_valid(models)),  -- NULL: every model
            privacy      TEXT CHECK (privacy IS NULL OR privacy IN ('local_only', 'local_preferred', 'any')),
            rpm          INTEGER CHECK (rpm IS NULL OR rpm > 0),
            tpm          INTEGER CHECK (tpm IS NULL OR tpm > 0),
            created_at   REAL NOT NULL,  -- unix seconds, as are the other *_at columns
            expires_at   REAL,
            revoked_at   REAL,
            last_used_at REAL
        ) STRICT;
        -- A name names one live key; a revoked key's name may be reused.
        CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;

        CREATE TABLE audit_events (
            id         INTEGER PRIMARY KEY,
            created_at REAL NOT NULL,
            event      TEXT NOT NULL,
            key_id     TEXT,  -- the key that acted or failed, when one is known
            client     TEXT,  -- the client's address, or "cli"
            method     TEXT,
            path       TEXT,
            status     INTEGER,
            detail     TEXT CHECK (detail IS NULL OR json_valid(detail))
        ) STRICT;
        CREATE INDEX audit_events_created_at ON audit_events (created_at);
        """
    )


def _add_prompt_and_completion(conn: apsw.Connection) -> None:
    # What was asked and answered, stored only with LOCOPILOT_LOG_PROMPTS (NULL otherwise).
    conn.execute(
        """
        ALTER TABLE inference_logs ADD COLUMN prompt TEXT CHECK (prompt IS NULL OR json_valid(prompt));
        ALTER TABLE inference_logs ADD COLUMN completion TEXT;
        """
    )


def _add_training_service(conn: apsw.Connection) -> None:
    # The job service (locopilot.training.jobs): each job's lineage and result, its events
    # (progress, loss) and the uploaded files it trains on.
    conn.execute(
        """
        ALTER TABLE training_jobs ADD COLUMN framework TEXT NOT NULL DEFAULT 'llama.cpp';
        ALTER TABLE training_jobs ADD COLUMN base_sha256 TEXT;
        ALTER TABLE training_jobs ADD COLUMN training_file TEXT;  -- a files.id
        ALTER TABLE training_jobs ADD COLUMN dataset_sha256 TEXT;
        ALTER TABLE training_jobs ADD COLUMN output_path TEXT;
        ALTER TABLE training_jobs ADD COLUMN output_sha256 TEXT;
        ALTER TABLE training_jobs ADD COLUMN error_code TEXT;
        ALTER TABLE training_jobs ADD COLUMN seed INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE training_jobs ADD COLUMN trained_tokens INTEGER;
        ALTER TABLE training_jobs ADD COLUMN result TEXT CHECK (result IS NULL OR json_valid(result));
        ALTER TABLE training_jobs ADD COLUMN key_id TEXT;  -- the API key that created it
        ALTER TABLE training_jobs ADD COLUMN remote TEXT;  -- the upstream that runs it; NULL: this server
        ALTER TABLE training_jobs ADD COLUMN remote_job TEXT;  -- the job's id there
        CREATE INDEX training_jobs_status ON training_jobs (status, created_at);

        CREATE TABLE training_events (
            id         INTEGER PRIMARY KEY,
            job_id     TEXT NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            level      TEXT NOT NULL CHECK (level IN ('info', 'warn', 'error')),
            type       TEXT NOT NULL CHECK (type IN ('message', 'metrics')),
            message    TEXT NOT NULL,
            data       TEXT CHECK (data IS NULL OR json_valid(data))
        ) STRICT;
        CREATE INDEX training_events_job ON training_events (job_id, id);

        CREATE TABLE files (
            id         TEXT PRIMARY KEY,
            purpose    TEXT NOT NULL,
            filename   TEXT NOT NULL,
            bytes      INTEGER NOT NULL,
            sha256     TEXT NOT NULL CHECK (length(sha256) = 64),
            path       TEXT NOT NULL,  -- under the data folder; the name is the server's
            format     TEXT,
            examples   INTEGER,
            key_id     TEXT,
            created_at REAL NOT NULL
        ) STRICT;
        """
    )


def _create_model_records(conn: apsw.Connection) -> None:
    # Where each model came from and what it was when it arrived (locopilot.store.models).
    conn.execute(
        """
        CREATE TABLE model_records (
            name       TEXT PRIMARY KEY,
            source     TEXT NOT NULL,  -- the pull ref, a URL, or file:PATH
            sha256     TEXT CHECK (sha256 IS NULL OR length(sha256) = 64),  -- of the file (a split's first part)
            size       INTEGER NOT NULL,  -- bytes, all parts together
            files      TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(files)),  -- each part: name, sha256, size
            metadata   TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),  -- an Ollama template, params...
            pinned     INTEGER NOT NULL DEFAULT 0,  -- the sha256 was given by the operator
            arrived_at REAL NOT NULL  -- unix seconds
        ) STRICT;
        """
    )


def _create_responses(conn: apsw.Connection) -> None:
    # Stored Responses API responses (locopilot.store.responses): the Response object as
    # answered, and its input and output items in order, to replay a chain and find items by id.
    conn.execute(
        """
        CREATE TABLE responses (
            id                   TEXT PRIMARY KEY,
            key_id               TEXT,  -- the API key that created it; NULL on an open server
            model                TEXT NOT NULL,
            status               TEXT NOT NULL CHECK (
                status IN ('completed', 'incomplete', 'failed', 'cancelled', 'in_progress', 'queued')
            ),
            previous_response_id TEXT,  -- not a foreign key: the previous one may be deleted first
            created_at           REAL NOT NULL,  -- unix seconds
            body                 TEXT NOT NULL CHECK (json_valid(body))
        ) STRICT;
        CREATE INDEX responses_created_at ON responses (created_at);

        CREATE TABLE response_items (
            response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
            position    INTEGER NOT NULL,  -- input items first, then output items
            output      INTEGER NOT NULL CHECK (output IN (0, 1)),
            item_id     TEXT NOT NULL,
            item        TEXT NOT NULL CHECK (json_valid(item)),
            PRIMARY KEY (response_id, position)
        ) STRICT;
        CREATE INDEX response_items_item_id ON response_items (item_id);
        """
    )


def _add_hf_base(conn: apsw.Connection) -> None:
    # A job trained by an external framework: the base in Hugging Face form, a folder on the server.
    conn.execute("ALTER TABLE training_jobs ADD COLUMN hf_base TEXT;")


MIGRATIONS: list[Callable[[apsw.Connection], None]] = [
    _create_inference_logs_and_training_jobs,
    _add_routing_decisions,
    _create_api_keys_and_audit_events,
    _add_cached_tokens,
    _add_prompt_and_completion,
    _add_training_service,
    _create_model_records,
    _create_responses,
    _add_hf_base,
]


def migrate(conn: apsw.Connection) -> None:
    """Apply every migration past the database's ``user_version``, each in its own transaction.

    Each step and its ``user_version`` bump commit together, and the version is re-read
    under the write lock, so two processes opening the same file at once apply each step
    exactly once. Safe to call on an up-to-date database (it does nothing).

    Raises:
        StoreError: the database was written by a newer locopilot (its version is past
            ``len(MIGRATIONS)``). apsw errors from a failing step propagate untranslated;
            :meth:`Database.open` translates them.
    """
    while True:
        with write_transaction(conn):
            version: int = conn.pragma("user_version")
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database {conn.filename} has schema version {version}, but this locopilot knows "
                    f"versions up to {len(MIGRATIONS)}; upgrade locopilot or point it at another data folder"
                )
            if version == len(MIGRATIONS):
                return
            MIGRATIONS[version](conn)
            conn.pragma("user_version", version + 1)
