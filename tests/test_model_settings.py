"""Per-model settings (LOCOPILOT_MODEL_SETTINGS): parsed with errors naming model and field, applied to runners."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from locopilot.settings import SettingsError, load_settings
from tests.conftest import GEMMA, SMOL, Server

ENTRIES = {
    SMOL: {"ctx_size": 1024, "parallel": 1, "threads": 1, "chat_template": "gemma"},
    "gemma*": {"ctx_size": 512, "keep_loaded": True},
}


def test_an_exact_name_wins_then_the_first_glob() -> None:
    settings = load_settings(
        {"HOME": "/h", "LOCOPILOT_MODEL_SETTINGS": json.dumps({"a*": {"parallel": 3}, "abc": {"parallel": 2}})}
    )
    assert settings.for_model("abc").parallel == 2
    assert settings.for_model("abd").parallel == 3
    other = settings.for_model("zzz")
    assert (other.parallel, other.ctx_size, other.idle_ttl) == (0, 4096, 300)


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ('{"smol": {"ctx_size": -1}}', ["'smol'", "ctx_size"]),
        ('{"smol": {"context": 1}}', ["'smol'", "context"]),
        ('{"../x": {}}', ["'../x'"]),
        ("[1]", ["JSON object"]),
        ('{"smol": {"chat_template": "/nonexistent.jinja"}}', ["'smol'", "chat_template"]),
    ],
)
def test_bad_values_name_the_model_and_field(value: str, names: list[str]) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"HOME": "/h", "LOCOPILOT_MODEL_SETTINGS": value})
    assert raised.value.variable == "LOCOPILOT_MODEL_SETTINGS"
    for name in names:
        assert name in str(raised.value)


def test_runners_get_their_models_settings(tmp_path: Path, smollm2_path: Path, gemma_path: Path) -> None:
    env = {"LOCOPILOT_MODEL_SETTINGS": json.dumps(ENTRIES), "LOCOPILOT_MAX_LOADED_MODELS": "2"}
    server = Server(tmp_path, {SMOL: smollm2_path, GEMMA: gemma_path}, env).start()
    try:
        for name in (SMOL, GEMMA):
            assert httpx.post(f"{server.url}/v1/locopilot/models/{name}/load", timeout=120).status_code == 200
        runners = {r["model"]: r for r in server.engine_health()["engine"]["runners"]}  # type: ignore[index]
    finally:
        server.stop()
    assert (runners[SMOL]["n_ctx"], runners[SMOL]["slots"], runners[SMOL]["threads_batch"]) == (1024, 1, 1)
    assert runners[SMOL]["chat_template"] == "gemma"  # over SmolLM2's own
    assert runners[GEMMA]["chat_template"] == "gemma"  # Gemma's fallback, as without settings
    assert runners[GEMMA]["n_ctx"] == 512  # per slot


def huge_gguf(path: Path, tensor_bytes: int) -> Path:
    """A valid GGUF whose one tensor claims ``tensor_bytes``: a sparse file, so the claim costs no disk."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(2048)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(1)
    writer.add_token_list(["a", "b"])
    writer.add_tensor_info("weight", (tensor_bytes // 4096, 1024), np.dtype(np.float32), tensor_bytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    start = -(-path.stat().st_size // 32) * 32
    with path.open("r+b") as file:
        file.truncate(start + tensor_bytes)
    return path


def test_a_model_too_big_for_memory_is_refused_without_a_runner(tmp_path: Path, smollm2_path: Path) -> None:
    from locopilot.models.gguf import read_header

    huge = huge_gguf(tmp_path / "huge-src.gguf", 1 << 40)  # 1 TiB of weights
    assert read_header(huge).tensor_bytes == 1 << 40
    server = Server(tmp_path, {"huge": huge, SMOL: smollm2_path}).start()
    try:
        body = {"model": "huge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        loaded = httpx.post(f"{server.url}/v1/locopilot/models/huge/load", timeout=60)
        health = server.engine_health()["engine"]
    finally:
        server.stop()
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "1024.00 GiB" in error["message"] and "is free" in error["message"]
    assert loaded.status_code == 503 and loaded.json()["error"]["code"] == "insufficient_memory"
    assert health["runners"] == []  # type: ignore[index]
    assert "runner" not in server.log_path.read_text().lower().replace("runner_", "")
