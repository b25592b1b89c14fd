"""Per-model settings (LOCOPILOT_MODEL_SETTINGS): parsed with errors naming model and field, applied to runners."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from locopilot.settings import SettingsError, load_settings
from tests.conftest import GEMMA, SMOL, Server

ENTRIES = {SMOL: {"ctx_size": 1024, "parallel": 1, "threads": 1}, "gemma*": {"ctx_size": 512, "keep_loaded": True}}


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
    assert runners[GEMMA]["n_ctx"] == 512  # per slot
