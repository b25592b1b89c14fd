"""Training wire types: the uploaded file (``/v1/files``, OpenAI's object) and locopilot's own
training jobs (``/v1/locopilot/training/jobs``): what the server answers, and what its clients
(the command line; another locopilot mirroring a job it sent there) decode through
:mod:`locopilot.client`. Request bodies stay with their routes."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from locopilot.store.jobs import JobStatus


class FileObject(msgspec.Struct):
    """OpenAI's file object."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: Literal["file"] = "file"
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    format: str | None = None
    """locopilot's: the dataset's form (``openai``, ``sharegpt``, ``alpaca``)."""
    examples: int | None = None
    """locopilot's: examples in the file."""
    sha256: str | None = None


class JobErrorInfo(msgspec.Struct):
    code: str
    message: str
    param: str | None = None


class JobInfo(msgspec.Struct, kw_only=True):
    """A job as locopilot shows it (no file-system paths)."""

    id: str
    object: Literal["locopilot.training.job"] = "locopilot.training.job"
    status: JobStatus
    framework: str
    """``llama.cpp`` (the built-in trainer), or the external framework: ``unsloth``, ``axolotl``, ``mlx``."""
    model: str
    base_sha256: str | None
    training_file: str | None
    dataset_sha256: str | None
    hyperparameters: dict[str, Any]
    seed: int
    fine_tuned_model: str | None
    output_sha256: str | None
    progress: float
    trained_tokens: int | None
    result: dict[str, Any] | None
    error: JobErrorInfo | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    remote: str | None = None
    """The upstream that runs the job; null: this server."""
    remote_job: str | None = None
    hf_base: str | None = None
    """A framework's job: the base in Hugging Face form that it trained (a folder on the server)."""


class JobList(msgspec.Struct):
    data: list[JobInfo]
    has_more: bool
    object: Literal["list"] = "list"


class LogEvent(msgspec.Struct):
    """One SSE event's data: a job event (``event: message`` or ``event: metrics``)."""

    id: int
    created_at: float
    level: str
    message: str
    data: dict[str, Any] | None
