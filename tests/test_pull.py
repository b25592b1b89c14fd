"""Pulling models: every ref form through the real CLI and the real server, against protocol-true
stand-ins of the Hugging Face hub, an Ollama registry and a file server (tests/fakes/hubs.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server
from tests.fakes.hubs import ModelHubs, gguf_bytes

ADMIN = "pull-test-admin-key-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("gguf")
    made = {name: gguf_bytes(tmp, tensor_bytes=512 * 1024, seed=i) for i, name in enumerate("abcdefghij")}
    return {**made, "client": gguf_bytes(tmp, tensor_bytes=512 * 1024, seed=10)}


@pytest.fixture(scope="module")
def hubs(blobs: dict[str, bytes]) -> Iterator[ModelHubs]:
    with ModelHubs() as running:
        running.add_hf(
            "acme/Tiny-GGUF",
            {"tiny.Q4_K_M.gguf": blobs["a"], "tiny.Q8_0.gguf": blobs["b"], "README.md": b"# tiny", "mmproj.gguf": b"x"},
        )
        running.add_hf(
            "acme/Split-GGUF",
            {f"Q8_0/split-Q8_0-0000{i}-of-00003.gguf": blobs["cde"[i - 1]] for i in (1, 2, 3)},
        )
        running.add_hf("acme/Gated-GGUF", {"gated.Q4_K_M.gguf": blobs["f"]}, token="hf_secret")
        running.add_ollama("library/tiny:1b", blobs["g"], template="{{ .Prompt }}", params='{"stop":["<|end|>"]}')
        running.add_ollama("acme/other:q8", blobs["h"])
        running.add_ollama("acme/client:1b", blobs["client"])
        yield running


def environment(hubs: ModelHubs, root: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
        "LOCOPILOT_DATA_DIR": str(root / "data"),
        "LOCOPILOT_MODELS_DIR": str(root / "models"),
        "LOCOPILOT_HF_ENDPOINT": hubs.hub_url,
        "LOCOPILOT_OLLAMA_REGISTRY": hubs.hub_url,
        # No server answers on port 1: the CLI pulls into the folder itself, reading no service env file.
        "LOCOPILOT_PORT": "1",
        "XDG_CONFIG_HOME": str(root / "config"),
        "COLUMNS": "300",  # rich wraps what it prints at the terminal's width
        **extra,
    }


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locopilot", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hubs: ModelHubs, smollm2_path: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("pull-server")
    env = environment(hubs, root, LOCOPILOT_ADMIN_KEY=ADMIN, LOCOPILOT_HF_TOKEN="hf_secret")
    env = {k: v for k, v in env.items() if k not in ("LOCOPILOT_DATA_DIR", "LOCOPILOT_MODELS_DIR", "LOCOPILOT_PORT")}
    running = Server(root, {"smol": smollm2_path}, env)
    running.start(path="/health")
    yield running
    running.stop()


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event, json.loads(line.removeprefix("data: "))
            event = "message"


def pull(server: Server, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with httpx.stream(
        "POST", f"{server.url}/v1/locopilot/models/pull", json=body, headers=HEADERS, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response))


def statuses(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [data["status"] for kind, data in events if kind == "progress"]


# -- the CLI ---------------------------------------------------------------------------


def test_cli_pulls_every_ref_form(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    env = environment(hubs, tmp_path)
    host = hubs.hub_url.removeprefix("http://")
    url = hubs.file_url(blobs["i"], "plain.gguf")
    cases = [
        (["hf.co/acme/Tiny-GGUF"], "tiny:q4_k_m", blobs["a"]),  # the default quantization
        (["hf.co/acme/Tiny-GGUF:q8_0"], "tiny:q8_0", blobs["b"]),
        (["hf.co/acme/Tiny-GGUF/tiny.Q8_0.gguf", "--name", "file-form"], "file-form", blobs["b"]),
        (["tiny:1b"], "tiny:1b", blobs["g"]),
        ([f"http://{host}/acme/other:q8", "--insecure"], "other:q8", blobs["h"]),
        ([url, "--sha256", sha(blobs["i"])], "plain", blobs["i"]),
    ]
    for args, name, data in cases:
        done = cli(env, "pull", *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert f"pulled {name}" in done.stdout
        assert (tmp_path / "models" / f"{name}.gguf").read_bytes() == data
    listed = cli(env, "models", "list", "--names").stdout.split()
    assert sorted(listed) == sorted(name for _, name, _ in cases)
    # Nothing but models and the (empty) downloads folder.
    assert sorted(p.name for p in (tmp_path / "models" / ".downloads").iterdir()) == []


def test_cli_refuses_before_any_traffic(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    env = environment(hubs, tmp_path)
    before = len(hubs.requests)
    url = hubs.file_url(blobs["i"], "plain.gguf")
    assert "needs its sha256" in cli(env, "pull", url).stderr
    assert "plain-http registry" in cli(env, "pull", f"http://{hubs.hub_url[7:]}/acme/other:q8").stderr
    assert cli(env, "pull", "hf.co/acme/../x").returncode == 2
    assert cli(env, "pull", "tiny:1b", "--name", "../escape").returncode == 2
    # The plain-http refusal needs no traffic either: only the names were looked at.
    assert len(hubs.requests) == before
    missing = cli(env, "pull", "hf.co/acme/Tiny-GGUF:Q2_K")
    assert missing.returncode == 1
    assert "has no Q2_K GGUF" in missing.stderr and "Q4_K_M, Q8_0" in missing.stderr


def test_cli_split_model(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    env = environment(hubs, tmp_path)
    done = cli(env, "pull", "hf.co/acme/Split-GGUF:Q8_0")
    assert done.returncode == 0, done.stderr
    link = tmp_path / "models" / "split:q8_0.gguf"
    assert link.is_symlink()
    # llama.cpp finds the other parts by the first part's own name, in its folder.
    first = link.resolve()
    assert first.name == "split-Q8_0-00001-of-00003.gguf"
    assert [p.read_bytes() for p in sorted(first.parent.iterdir())] == [blobs["c"], blobs["d"], blobs["e"]]


def test_cli_gated_repository_needs_the_token(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    refused = cli(environment(hubs, tmp_path), "pull", "hf.co/acme/Gated-GGUF")
    assert refused.returncode == 1 and "LOCOPILOT_HF_TOKEN" in refused.stderr
    done = cli(environment(hubs, tmp_path, LOCOPILOT_HF_TOKEN="hf_secret"), "pull", "hf.co/acme/Gated-GGUF")
    assert done.returncode == 0, done.stderr
    # The token went to the hub, never to the file server it redirected to.
    fetched = hubs.downloads(blobs["f"])
    assert fetched and all("authorization" not in headers for headers in fetched)


def test_resumes_after_a_cut_connection(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    data = blobs["j"]
    hubs.add_hf("acme/Cut-GGUF", {"cut.Q4_K_M.gguf": data})
    hubs.cut_next(data, 200_000)
    done = cli(environment(hubs, tmp_path), "pull", "hf.co/acme/Cut-GGUF")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "cut:q4_k_m.gguf").read_bytes() == data
    ranges = [headers.get("range") for headers in hubs.downloads(data)]
    assert ranges[0] is None and ranges[1] is not None
    assert ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) >= 150_000


def test_a_corrupted_byte_leaves_nothing(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    data = gguf_bytes(tmp_path, tensor_bytes=256 * 1024, seed=99)
    hubs.add_hf("acme/Bad-GGUF", {"bad.Q4_K_M.gguf": data})
    hubs.corrupt(data)
    done = cli(environment(hubs, tmp_path), "pull", "hf.co/acme/Bad-GGUF")
    assert done.returncode == 1
    assert "is not the published" in done.stderr
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == [".downloads"]
    assert list((models / ".downloads").iterdir()) == []


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_is_refused_before_downloading(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    with tmpfs(tmp_path / "small", "256k") as small:
        env = {**environment(hubs, tmp_path), "LOCOPILOT_MODELS_DIR": str(small)}
        before = len(hubs.downloads(blobs["a"]))
        done = cli(env, "pull", "hf.co/acme/Tiny-GGUF")
        assert done.returncode == 1
        assert "more bytes" in done.stderr and "free" in done.stderr
        assert len(hubs.downloads(blobs["a"])) == before
        assert [p.name for p in small.iterdir()] == [".downloads"]
        assert list((small / ".downloads").iterdir()) == []


# -- the server ------------------------------------------------------------------------


def test_server_pull_streams_progress_then_the_card(server: Server, blobs: dict[str, bytes]) -> None:
    events = pull(server, {"model": "hf.co/acme/Tiny-GGUF:Q8_0", "name": "served"})
    steps = statuses(events)
    digest = sha(blobs["b"])
    assert steps[0] == "pulling manifest"
    assert steps[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = [data for kind, data in events if kind == "progress" and data.get("digest")]
    assert progress and all(p["status"] == f"pulling {digest[:12]}" for p in progress)
    assert progress[-1]["completed"] == progress[-1]["total"] == len(blobs["b"])
    kind, card = events[-1]
    assert kind == "model"
    assert card["id"] == "served" and card["sha256"] == digest
    assert card["source"] == "hf.co/acme/Tiny-GGUF/tiny.Q8_0.gguf" and card["arrived_at"] > 0
    shown = httpx.get(f"{server.url}/v1/models/served", headers=HEADERS).json()
    assert (shown["sha256"], shown["source"]) == (digest, card["source"])


def test_server_pull_of_each_form_and_errors(server: Server, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    assert statuses(pull(server, {"model": "tiny:1b"}))[-1] == "success"
    assert statuses(pull(server, {"model": "hf.co/acme/Gated-GGUF"}))[-1] == "success"  # the server has the token
    url = hubs.file_url(blobs["i"], "served-url.gguf")
    events = pull(server, {"model": url, "sha256": sha(blobs["i"])})
    assert events[-1][1]["id"] == "served-url"
    # The same pull again: nothing to download.
    again = pull(server, {"model": "tiny:1b"})
    assert statuses(again) == ["pulling manifest", "success"]
    post = f"{server.url}/v1/locopilot/models/pull"
    bad = httpx.post(post, json={"model": url}, headers=HEADERS)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sha256"
    missing = httpx.post(post, json={"model": "hf.co/acme/Nothing-GGUF"}, headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    taken = httpx.post(post, json={"model": "acme/other:q8", "name": "tiny:1b"}, headers=HEADERS)
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "model_exists"
    whole = httpx.post(post, json={"model": "acme/other:q8", "stream": False}, headers=HEADERS, timeout=60)
    assert whole.status_code == 200 and whole.json()["sha256"] == sha(blobs["h"])


def test_concurrent_pulls_share_one_download(server: Server, hubs: ModelHubs, tmp_path: Path) -> None:
    data = gguf_bytes(tmp_path, tensor_bytes=768 * 1024, seed=7)
    hubs.add_hf("acme/Shared-GGUF", {"shared.Q4_K_M.gguf": data})
    hubs.rate = 1_500_000
    results: list[list[str]] = []
    try:
        threads = [
            threading.Thread(target=lambda: results.append(statuses(pull(server, {"model": "hf.co/acme/Shared-GGUF"}))))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        hubs.rate = None
    assert [r[-1] for r in results] == ["success", "success"]
    assert len(hubs.downloads(data)) == 1


def test_cancelled_pull_keeps_nothing_and_resumes(server: Server, hubs: ModelHubs, tmp_path: Path) -> None:
    data = gguf_bytes(tmp_path, tensor_bytes=1024 * 1024, seed=8)
    hubs.add_hf("acme/Slow-GGUF", {"slow.Q4_K_M.gguf": data})
    hubs.rate = 400_000
    downloads = server.models_dir / ".downloads"
    try:
        with httpx.stream(
            "POST",
            f"{server.url}/v1/locopilot/models/pull",
            json={"model": "hf.co/acme/Slow-GGUF"},
            headers=HEADERS,
            timeout=30,
        ) as response:
            for kind, event in sse_events(response):
                if kind == "progress" and (event.get("completed") or 0) > 100_000:
                    assert event["bytes_per_second"] > 0 and event["eta_seconds"] > 0
                    break
        # The client went away: the download stops, the partial file stays, no model appears.
        time.sleep(1.5)
        partial = downloads / f"sha256-{sha(data)}.partial"
        size = partial.stat().st_size
        time.sleep(1.0)
        assert 100_000 < partial.stat().st_size == size < len(data)
        assert not (server.models_dir / "slow:q4_k_m.gguf").exists()
    finally:
        hubs.rate = None
    assert statuses(pull(server, {"model": "hf.co/acme/Slow-GGUF"}))[-1] == "success"
    assert (server.models_dir / "slow:q4_k_m.gguf").read_bytes() == data
    assert hubs.downloads(data)[-1].get("range") == f"bytes={size}-", (hubs.downloads(data), server.log()[-3000:])


def test_the_ollama_client_pulls_with_progress(server: Server, blobs: dict[str, bytes]) -> None:
    """Ollama's own client against /api/pull: its progress lines, then the model among /api/tags."""
    import ollama

    with ollama.Client(host=server.url, headers=HEADERS) as client:
        with pytest.raises(ollama.ResponseError) as refused:
            client.pull("../escape")
        assert refused.value.status_code == 400
        progress = list(client.pull("acme/client:1b", stream=True))
        steps = [p.status for p in progress]
        assert steps[0] == "pulling manifest" and steps[-1] == "success", steps
        digest = f"sha256:{sha(blobs['client'])}"
        counted = [p for p in progress if p.digest == digest]
        assert counted and counted[-1].completed == counted[-1].total == len(blobs["client"])
        # Model names hold no '/': a namespaced Ollama name is kept by its last part.
        assert "client:1b" in [model.model for model in client.list().models]
        assert client.pull("acme/client:1b").status == "success"  # whole (stream false): nothing to download again


def test_model_routes_need_the_models_scope(server: Server) -> None:
    def key(scopes: list[str]) -> dict[str, str]:
        name = "k" + hashlib.sha256(str(scopes).encode()).hexdigest()[:8] + str(time.monotonic_ns())[-6:]
        created = httpx.post(f"{server.url}/v1/admin/keys", json={"name": name, "scopes": scopes}, headers=HEADERS)
        assert created.status_code == 201, created.text
        return {"Authorization": f"Bearer {created.json()['secret']}"}

    inference, models = key(["inference"]), key(["models"])
    routes = [
        ("POST", "/v1/locopilot/models/pull", {"model": "tiny:1b"}),
        ("GET", "/v1/locopilot/models/smol", None),
        ("POST", "/v1/locopilot/models/smol/load", None),
        ("POST", "/v1/locopilot/models/smol/unload", None),
        ("DELETE", "/v1/locopilot/models/nothing-here", None),
        ("GET", "/v1/locopilot/models", None),
        ("POST", "/v1/locopilot/models/smol/verify", None),
        ("POST", "/v1/locopilot/models", {"path": "/nowhere/x.gguf"}),
        ("POST", "/v1/locopilot/models/import", {"folder": "/nowhere"}),
    ]
    for method, path, body in routes:
        refused = httpx.request(method, server.url + path, json=body, headers=inference)
        assert refused.status_code == 403, (method, path)
        assert refused.json()["error"]["code"] == "insufficient_scope"
        allowed = httpx.request(method, server.url + path, json=body, headers=models, timeout=120)
        assert allowed.status_code in (200, 404) or allowed.json()["error"]["code"] == "path_not_found", (
            method,
            path,
            allowed.text,
        )


def test_add_and_import_check_their_bodies_first(server: Server) -> None:
    base = f"{server.url}/v1/locopilot/models"
    for body, param in [
        ({"path": "relative.gguf"}, "path"),
        ({"path": "/x.gguf", "sha256": "abc"}, "sha256"),
        ({"path": "/x.gguf", "name": "../evil"}, "model"),
        ({"path": "/x.gguf", "surprise": 1}, None),
    ]:
        refused = httpx.post(base, json=body, headers=HEADERS)
        assert refused.status_code == 400, (body, refused.text)
        assert param is None or refused.json()["error"]["param"] == param, (body, refused.text)
    refused = httpx.post(f"{base}/import", json={"folder": "x"}, headers=HEADERS)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "folder"
    assert httpx.post(f"{base}/nothing-here/verify", headers=HEADERS).status_code == 404


def test_cli_pulls_through_the_running_server(
    server: Server, hubs: ModelHubs, tmp_path: Path, blobs: dict[str, bytes]
) -> None:
    # The operator's shell knows neither the server nor its key: the service's env file does.
    env_file = tmp_path / "config" / "locopilot" / "locopilot.env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text(f"LOCOPILOT_PORT={server.port}\nLOCOPILOT_ADMIN_KEY={ADMIN}\n")
    env = {k: v for k, v in environment(hubs, tmp_path).items() if k != "LOCOPILOT_PORT"}
    done = cli(env, "pull", "hf.co/acme/Split-GGUF:Q8_0", "--name", "via-server")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "pulling manifest" in done.stdout and "split-Q8_0-00003-of-00003.gguf" in done.stdout
    assert "pulled via-server" in done.stdout and ADMIN not in done.stdout + done.stderr
    assert (server.models_dir / ".splits" / "via-server").is_dir()
    assert not (tmp_path / "models").exists()  # the CLI's own folder is not the service's
    listed = cli(env, "models", "list", "--names")
    assert "via-server" in listed.stdout.split() and listed.stderr == ""
    # Errors come back as the server words them, before and after the stream starts.
    missing = cli(env, "pull", "hf.co/acme/Absent-GGUF")
    assert missing.returncode == 1 and "HTTP 4" in missing.stderr
    taken = cli(env, "pull", "hf.co/acme/Tiny-GGUF", "--name", "via-server")
    assert taken.returncode == 1 and "exists" in taken.stderr
    assert cli(env, "models", "rm", "via-server").returncode == 0
    assert not (server.models_dir / ".splits" / "via-server").exists()


def test_load_unload_delete(server: Server, smollm2_path: Path) -> None:
    base = f"{server.url}/v1/locopilot/models"
    (server.models_dir / "victim.gguf").symlink_to(smollm2_path)
    loaded = httpx.post(f"{base}/victim/load", headers=HEADERS, timeout=120)
    assert loaded.json() == {"id": "victim", "loaded": True, "object": "model.load_state"}
    health = httpx.get(f"{server.url}/v1/engine/health", headers=HEADERS).json()
    assert "victim" in health["engine"]["loaded_models"]
    assert httpx.post(f"{base}/victim/unload", headers=HEADERS).json()["loaded"] is False
    health = httpx.get(f"{server.url}/v1/engine/health", headers=HEADERS).json()
    assert "victim" not in health["engine"]["loaded_models"]
    # Deleting a loaded model unloads it first; the link goes, its target stays.
    httpx.post(f"{base}/victim/load", headers=HEADERS, timeout=120)
    gone = httpx.delete(f"{base}/victim", headers=HEADERS)
    assert gone.json() == {"id": "victim", "deleted": True, "object": "model"}
    health = httpx.get(f"{server.url}/v1/engine/health", headers=HEADERS).json()
    assert "victim" not in health["engine"]["loaded_models"]
    assert not (server.models_dir / "victim.gguf").is_symlink() and smollm2_path.is_file()
    assert httpx.get(f"{base}/victim", headers=HEADERS).status_code == 404
    assert httpx.delete(f"{base}/..%2Fetc", headers=HEADERS).status_code in (400, 404)


def test_a_model_a_training_job_uses_cannot_be_deleted(server: Server, smollm2_path: Path) -> None:
    import apsw

    (server.models_dir / "base.gguf").symlink_to(smollm2_path)
    conn = apsw.Connection(str(server.db_path))
    conn.setbusytimeout(5000)
    conn.execute(
        "INSERT INTO training_jobs (id, status, base_model, dataset_path, created_at) "
        "VALUES ('ftjob-pulltest', 'running', 'base', '/nowhere', 0)"
    )
    try:
        refused = httpx.delete(f"{server.url}/v1/locopilot/models/base", headers=HEADERS)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_in_use"
        assert (server.models_dir / "base.gguf").is_symlink()
    finally:
        conn.execute("UPDATE training_jobs SET status = 'cancelled' WHERE id = 'ftjob-pulltest'")
        conn.close()
    assert httpx.delete(f"{server.url}/v1/locopilot/models/base", headers=HEADERS).status_code == 200


def test_models_add_pins_and_verify_reports_changes(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    env = environment(hubs, tmp_path)
    source = tmp_path / "pinned.gguf"
    source.write_bytes(blobs["a"])
    wrong = cli(env, "models", "add", str(source), "--sha256", "0" * 64)
    assert wrong.returncode == 1 and "nothing was added" in wrong.stderr
    assert not (tmp_path / "models" / "pinned.gguf").exists()
    added = cli(env, "models", "add", str(source), "--sha256", sha(blobs["a"]))
    assert added.returncode == 0, added.stderr
    checked = cli(env, "models", "verify")
    assert checked.returncode == 0 and "ok" in checked.stdout
    (tmp_path / "models" / "pinned.gguf").write_bytes(blobs["b"])
    changed = cli(env, "models", "verify", "pinned")
    assert changed.returncode == 1 and "CHANGED" in changed.stdout and sha(blobs["b"]) in changed.stdout


def test_a_replaced_model_file_is_reloaded(server: Server, smollm2_path: Path, gemma_path: Path) -> None:
    base = f"{server.url}/v1/locopilot/models"
    link = server.models_dir / "swapped.gguf"
    link.symlink_to(smollm2_path)

    def runner() -> dict[str, Any]:
        health = httpx.get(f"{server.url}/v1/engine/health", headers=HEADERS).json()
        return next(r for r in health["engine"]["runners"] if r["model"] == "swapped")

    assert httpx.post(f"{base}/swapped/load", headers=HEADERS, timeout=120).status_code == 200
    before = runner()
    assert httpx.post(f"{base}/swapped/load", headers=HEADERS, timeout=120).status_code == 200
    assert runner()["pid"] == before["pid"]  # unchanged: the same runner
    replacement = link.with_name(".swapped.tmp")
    replacement.symlink_to(gemma_path)
    os.replace(replacement, link)
    assert httpx.post(f"{base}/swapped/load", headers=HEADERS, timeout=120).status_code == 200
    after = runner()
    assert after["pid"] != before["pid"] and after["chat_template"] != before["chat_template"]
    httpx.delete(f"{base}/swapped", headers=HEADERS)


def test_pulls_go_through_https_proxy(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    from tests.fakes.hubs import ForwardProxy

    proxy = ForwardProxy()
    try:
        env = {k: v for k, v in environment(hubs, tmp_path).items() if k.lower() != "no_proxy"}
        done = cli({**env, "HTTPS_PROXY": proxy.url}, "pull", "hf.co/acme/Tiny-GGUF:Q8_0", "--name", "proxied")
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "proxied.gguf").read_bytes() == blobs["b"]
    # The listing, the hub's redirect and the file server all went through the proxy.
    assert any("/api/models/acme/Tiny-GGUF" in url for url in proxy.seen)
    assert any("/resolve/" in url for url in proxy.seen)
    assert any(url.startswith(hubs.cdn_url + "/blobs/") for url in proxy.seen)


@pytest.mark.anyio
async def test_ollama_progress_lines(tmp_path: Path, hubs: ModelHubs, blobs: dict[str, bytes]) -> None:
    """What the Ollama front sends for /api/pull: Ollama's statuses and fields, nothing else."""
    import anyio
    import msgspec

    from locopilot.models.catalog import ModelCatalog
    from locopilot.models.pull import Puller, ollama_progress
    from locopilot.settings import load_settings
    from locopilot.store.db import Database

    settings = load_settings(environment(hubs, tmp_path))
    db = Database.open(settings.db_path)
    try:
        async with anyio.create_task_group() as tasks:
            puller = Puller(settings, ModelCatalog(settings.models_path), db, tasks)
            lines = [msgspec.json.encode(p) async for p in ollama_progress(puller, "acme/other:q8")]
    finally:
        db.close()
    decoded = [json.loads(line) for line in lines]
    digest = f"sha256:{sha(blobs['h'])}"
    assert decoded[0] == {"status": "pulling manifest"}
    assert decoded[-3:] == [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    pulling = decoded[1:-3]
    assert pulling and all(set(line) <= {"status", "digest", "total", "completed"} for line in pulling)
    assert pulling[-1] == {
        "status": f"pulling {digest[7:19]}",
        "digest": digest,
        "total": len(blobs["h"]),
        "completed": len(blobs["h"]),
    }


def test_a_disk_that_fills_during_the_download_keeps_nothing(tmp_path: Path, hubs: ModelHubs) -> None:
    """A pull that fits when it starts, but another writer fills the disk while it downloads: it stops
    with a clean error and removes its partial file; the other writer's file stays."""
    model = gguf_bytes(tmp_path, tensor_bytes=640 * 1024, seed=41)
    hubs.add_hf("acme/Fill-GGUF", {"a.Q4_K_M.gguf": model})
    with tmpfs(tmp_path / "small", "1m") as small:
        env = {**environment(hubs, tmp_path), "LOCOPILOT_MODELS_DIR": str(small)}
        # The body waits until the test has filled the disk: deterministic however slowly the
        # CLI starts (two racing pulls, as this test once was, could both run out at once).
        hubs.hold = threading.Event()
        try:
            run = subprocess.Popen(
                [sys.executable, "-m", "locopilot", "pull", "hf.co/acme/Fill-GGUF"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while not hubs.downloads(model):
                assert run.poll() is None, run.communicate()
                assert time.monotonic() < deadline, "the pull never asked for the file"
                time.sleep(0.05)
            (small / "other-writer.bin").write_bytes(b"x" * 600 * 1024)
            hubs.hold.set()
            code, err = run.wait(60), run.communicate()[1]
        finally:
            hubs.hold = None
        assert code == 1, err
        assert "The disk is full" in err, err
        assert sorted(p.name for p in small.iterdir()) == [".downloads", "other-writer.bin"]
        assert list((small / ".downloads").iterdir()) == []


def test_a_pull_that_fits_only_without_another_under_way_is_refused_before_downloading(
    tmp_path: Path, hubs: ModelHubs
) -> None:
    """One server, two different pulls that each fit alone but not together: the second is refused with a
    507 before a byte of it is fetched (it counts what the first will still write), and the first completes."""
    first, second = (gguf_bytes(tmp_path, tensor_bytes=640 * 1024, seed=s) for s in (43, 44))
    hubs.add_hf("acme/Room-A-GGUF", {"a.Q4_K_M.gguf": first})
    hubs.add_hf("acme/Room-B-GGUF", {"b.Q4_K_M.gguf": second})
    with tmpfs(tmp_path / "small", "1m") as small:
        env = environment(hubs, tmp_path, LOCOPILOT_ADMIN_KEY=ADMIN, LOCOPILOT_MODELS_DIR=str(small))
        env = {k: v for k, v in env.items() if k not in ("LOCOPILOT_DATA_DIR", "LOCOPILOT_PORT")}
        server = Server(tmp_path / "server", {}, env).start(path="/health")
        hubs.rate = 200_000
        try:
            body = {"model": "hf.co/acme/Room-A-GGUF", "name": "room-a"}
            with httpx.stream(
                "POST", f"{server.url}/v1/locopilot/models/pull", json=body, headers=HEADERS, timeout=60
            ) as response:
                events = sse_events(response)
                for kind, data in events:
                    if kind == "progress" and (data.get("completed") or 0) > 0:
                        break  # the first download is under way
                before = len(hubs.downloads(second))
                refused = httpx.post(
                    f"{server.url}/v1/locopilot/models/pull",
                    json={"model": "hf.co/acme/Room-B-GGUF", "name": "room-b", "stream": False},
                    headers=HEADERS,
                    timeout=60,
                )
                assert refused.status_code == 507, refused.text
                assert "promised to other pulls under way" in refused.json()["error"]["message"]
                assert len(hubs.downloads(second)) == before
                assert [kind for kind, _ in events][-1] == "model"
        finally:
            hubs.rate = None
            server.stop()
        assert (small / "room-a.gguf").read_bytes() == first
        assert not (small / "room-b.gguf").exists() and list((small / ".downloads").iterdir()) == []
