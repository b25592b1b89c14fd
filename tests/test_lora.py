"""LoRA adapters: PEFT and MLX-LM folders converted to GGUF LoRA, served beside their base, and merged.

The adapters are made here with numpy for SmolLM2-135M (a llama model: 30 blocks, 9 heads, 3 KV
heads, width 576); Hugging Face's shapes for its projections follow from the GGUF's.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import openai
import pytest

from locopilot.providers.embedded import UNSETTLED_TTL
from locopilot.training import lora, peft
from tests.conftest import SMOL, Server, start_server

WIDTH, KV_WIDTH, FFN, HEADS, KV_HEADS = 576, 192, 1536, 9, 3
SHAPES = {  # Hugging Face module -> (n_out, n_in)
    "self_attn.q_proj": (WIDTH, WIDTH),
    "self_attn.k_proj": (KV_WIDTH, WIDTH),
    "self_attn.v_proj": (KV_WIDTH, WIDTH),
    "self_attn.o_proj": (WIDTH, WIDTH),
    "mlp.down_proj": (WIDTH, FFN),
}
PROMPT = [{"role": "user", "content": "Which city is the capital of France?"}]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of F32 tensors, as the safetensors library writes one."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def peft_folder(
    folder: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], r: int, alpha: float, **config: object
) -> Path:
    """A PEFT adapter folder: ``pairs`` maps ``N.self_attn.q_proj`` to (lora_A, lora_B)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (a, b) in pairs.items():
        block, module = key.split(".", 1)
        stem = f"base_model.model.model.layers.{block}.{module}"
        tensors[f"{stem}.lora_A.weight"] = a
        tensors[f"{stem}.lora_B.weight"] = b
    write_safetensors(folder / peft.WEIGHTS, tensors)
    modules = sorted({key.split(".")[-1] for key in pairs})
    body = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": modules, **config}
    (folder / peft.CONFIG).write_text(json.dumps(body))
    return folder


def mlx_folder(folder: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, **config: object) -> Path:
    """An MLX-LM adapter folder for the same ``pairs`` (PEFT's lora_A, lora_B): MLX-LM's layer keeps
    lora_a ``(n_in, r)`` and lora_b ``(r, n_out)`` and adds ``scale·(x·lora_a)·lora_b``; its
    adapter_config.json is the training command's arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (a, b) in pairs.items():
        block, module = key.split(".", 1)
        tensors[f"model.layers.{block}.{module}.lora_a"] = a.T
        tensors[f"model.layers.{block}.{module}.lora_b"] = b.T
    write_safetensors(folder / peft.MLX_WEIGHTS, tensors)
    rank = next(iter(pairs.values()))[0].shape[0]
    body = {
        "fine_tune_type": "lora",
        "num_layers": 16,
        "lora_parameters": {"rank": rank, "dropout": 0.0, "scale": scale},
        "optimizer": "adam",
        **config,
    }
    (folder / peft.CONFIG).write_text(json.dumps(body))
    return folder


def random_pairs(seed: int, size: float, blocks: range, r: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = {}
    for block in blocks:
        for module, (n_out, n_in) in SHAPES.items():
            a = rng.standard_normal((r, n_in)).astype(np.float32) / np.sqrt(n_in)
            b = rng.standard_normal((n_out, r)).astype(np.float32) * size
            pairs[f"{block}.{module}"] = (a, b)
    return pairs


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama's q/k permutation: GGUF rows back to Hugging Face's order."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def base_weight(path: Path, name: str) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def test_q_and_k_rows_follow_llamas_permutation(tmp_path: Path, smollm2_path: Path) -> None:
    """An adapter that removes most of q_proj and k_proj in Hugging Face's row order removes most of
    the GGUF's q and k only if lora_B's rows were permuted as convert_hf_to_gguf permutes the weights."""
    pairs = {}
    for module, name, heads in (("q_proj", "attn_q", HEADS), ("k_proj", "attn_k", KV_HEADS)):
        hf = unpermute(base_weight(smollm2_path, f"blk.3.{name}.weight"), heads)
        u, s, vt = np.linalg.svd(hf, full_matrices=False)
        pairs[f"3.self_attn.{module}"] = (vt[:64].astype(np.float32), -(u[:, :64] * s[:64]).astype(np.float32))
    adapter = peft.convert(peft_folder(tmp_path / "p", pairs, r=64, alpha=64), smollm2_path, SMOL)
    assert adapter.alpha == 0 and set(adapter.pairs) == {"blk.3.attn_q.weight", "blk.3.attn_k.weight"}
    for name in adapter.pairs:
        weight = base_weight(smollm2_path, name)
        left = np.linalg.norm(weight + adapter.delta(name)) / np.linalg.norm(weight)
        assert left < 0.8, (name, left)
        # Without the permutation the same delta lands on the wrong rows and adds to the weight.
        a, b = adapter.pairs[name]
        wrong = unpermute(b, HEADS if "attn_q" in name else KV_HEADS) @ a
        assert np.linalg.norm(weight + wrong) / np.linalg.norm(weight) > 1.0


def test_peft_scale_is_folded_into_b(tmp_path: Path, smollm2_path: Path) -> None:
    pairs = random_pairs(1, 0.1, range(1), r=4)
    plain = peft.convert(peft_folder(tmp_path / "a", pairs, r=4, alpha=8), smollm2_path, SMOL)
    rs = peft.convert(peft_folder(tmp_path / "b", pairs, r=4, alpha=8, use_rslora=True), smollm2_path, SMOL)
    a, b = pairs["0.self_attn.v_proj"]
    np.testing.assert_allclose(plain.delta("blk.0.attn_v.weight"), 2.0 * b @ a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rs.delta("blk.0.attn_v.weight"), 4.0 * b @ a, rtol=1e-5, atol=1e-7)
    lora.write(tmp_path / "a.gguf", plain)
    back = lora.read(tmp_path / "a.gguf")
    assert back.base == SMOL and back.architecture == "llama"
    np.testing.assert_array_equal(back.pairs["blk.0.attn_v.weight"][1], plain.pairs["blk.0.attn_v.weight"][1])


def test_unconvertible_peft_adapters_are_refused(tmp_path: Path, smollm2_path: Path) -> None:
    pairs = random_pairs(2, 0.1, range(1))
    with pytest.raises(lora.AdapterError, match="DoRA"):
        peft.convert(peft_folder(tmp_path / "d", pairs, r=4, alpha=8, use_dora=True), smollm2_path, SMOL)
    wide = {"0.self_attn.q_proj": (np.zeros((4, 100), np.float32), np.zeros((WIDTH, 4), np.float32))}
    with pytest.raises(lora.AdapterError, match="base has"):
        peft.convert(peft_folder(tmp_path / "w", wide, r=4, alpha=8), smollm2_path, SMOL)
    with pytest.raises(
        lora.AdapterError, match=r"neither adapter_model\.safetensors \(PEFT\) nor adapters\.safetensors"
    ):
        peft.convert(tmp_path, smollm2_path, SMOL)


def test_an_mlx_lm_adapter_converts_to_the_delta_of_the_same_peft_adapter(tmp_path: Path, smollm2_path: Path) -> None:
    """MLX-LM's layout (transposed matrices, its scale not divided by the rank) gives the same GGUF
    adapter as PEFT's folder for the same change, q/k permutation included."""
    pairs = random_pairs(7, 0.1, range(2), r=4)
    from_peft = peft.convert(peft_folder(tmp_path / "p", pairs, r=4, alpha=8), smollm2_path, SMOL)
    from_mlx = peft.convert(mlx_folder(tmp_path / "m", pairs, scale=2.0), smollm2_path, SMOL)
    assert set(from_mlx.pairs) == set(from_peft.pairs) and len(from_mlx.pairs) == 2 * len(SHAPES)
    for name in from_peft.pairs:
        np.testing.assert_allclose(from_mlx.delta(name), from_peft.delta(name), rtol=1e-6, atol=1e-9)
    a, b = pairs["1.self_attn.v_proj"]
    np.testing.assert_allclose(from_mlx.delta("blk.1.attn_v.weight"), 2.0 * b @ a, rtol=1e-5, atol=1e-7)


def test_mlx_lm_adapters_that_are_not_lora_are_refused(tmp_path: Path, smollm2_path: Path) -> None:
    pairs = random_pairs(8, 0.1, range(1))
    with pytest.raises(lora.AdapterError, match="fine_tune_type 'dora'; only MLX-LM's LoRA adapters"):
        peft.convert(mlx_folder(tmp_path / "d", pairs, scale=20.0, fine_tune_type="dora"), smollm2_path, SMOL)
    folder = mlx_folder(tmp_path / "s", pairs, scale=20.0)
    (folder / peft.CONFIG).write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 4}}))
    with pytest.raises(lora.AdapterError, match=r"needs lora_parameters\.scale"):
        peft.convert(folder, smollm2_path, SMOL)
    (folder / peft.CONFIG).unlink()
    with pytest.raises(lora.AdapterError, match=r"no adapter_config\.json: MLX-LM writes one"):
        peft.convert(folder, smollm2_path, SMOL)


def run_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**server.env, "LOCOPILOT_PORT": "1"}  # no server answers there: the command works on the folder
    return subprocess.run(
        [sys.executable, "-m", "locopilot", "models", *args], env=env, capture_output=True, text=True, timeout=300
    )


F32 = "smol-f32"


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    """SmolLM2 (Q4_1) with adapters ``bent`` (a moderate change of blocks 20-29) and ``loud`` (a large
    change of every block), and SmolLM2 as F32 with ``tiny`` (a change of about 1e-6) and ``bent``; all
    converted from PEFT folders through the CLI; and F32's ``bent-mlx``, ``bent`` from an MLX-LM folder.

    Close comparisons use the F32 base: with Q4_1 weights llama.cpp quantizes each matrix's input
    to 8 bits, so any change upstream, however small, can move a later input across a rounding
    step, and this small model's flat first-token distribution then shifts by tenths of a nat
    (measured: a 1e-6 adapter moved "The" from -1.91 to below -2.4). With F32 weights only the
    KV cache's F16 rounding remains.
    """
    from locopilot.training.export import to_f32

    folders = tmp_path_factory.mktemp("peft")
    f32 = folders / "smollm2-f32.gguf"
    to_f32(smollm2_path, f32, threads=2)
    running = start_server(tmp_path_factory, {SMOL: smollm2_path, F32: f32})
    for base, name, seed, size, blocks in (
        (SMOL, "bent", 4, 0.3, range(20, 30)),
        (SMOL, "loud", 5, 2.0, range(30)),
        (F32, "tiny", 3, 1e-6, range(30)),
        (F32, "bent", 4, 0.3, range(20, 30)),
    ):
        folder = peft_folder(folders / f"{base}-{name}", random_pairs(seed, size, blocks), r=4, alpha=4)
        done = run_cli(running, "adapter", str(folder), "--base", base, "--name", f"{base}-{name}")
        assert done.returncode == 0, done.stderr
    # The same change as F32's ``bent``, as MLX-LM writes it (its scale is PEFT's alpha / r).
    folder = mlx_folder(folders / "mlx-bent", random_pairs(4, 0.3, range(20, 30)), scale=1.0)
    done = run_cli(running, "adapter", str(folder), "--base", F32, "--name", f"{F32}-bent-mlx")
    assert done.returncode == 0, done.stderr
    yield running
    running.stop()


def listed(server: Server, name: str) -> None:
    """Wait until the server lists ``name``, and routes to it (a listing with a file that is not a
    model yet is kept for UNSETTLED_TTL)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(card["id"] == name for card in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]):
            time.sleep(UNSETTLED_TTL + 0.2)
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} was never listed")


def greedy(client: openai.OpenAI, model: str, max_tokens: int = 10) -> str:
    reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def first_logprobs(client: openai.OpenAI, model: str) -> list[float]:
    reply = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=True,  # type: ignore[arg-type]
    )
    assert reply.choices[0].logprobs is not None
    return [token.logprob for token in reply.choices[0].logprobs.content or []]


def test_adapters_are_listed_with_their_base(lora_server: Server) -> None:
    cards = {card["id"]: card for card in httpx.get(f"{lora_server.url}/v1/models", timeout=30).json()["data"]}
    for base, name in ((SMOL, "bent"), (SMOL, "loud"), (F32, "tiny"), (F32, "bent")):
        assert cards[f"{base}-{name}"]["adapter_of"] == base
    assert cards[SMOL].get("adapter_of") is None


def test_an_mlx_lm_adapter_is_served_as_the_same_peft_adapter_is(lora_server: Server) -> None:
    client = lora_server.client()
    peft_made, mlx_made = first_logprobs(client, f"{F32}-bent"), first_logprobs(client, f"{F32}-bent-mlx")
    assert max(abs(ours - theirs) for ours, theirs in zip(peft_made, mlx_made, strict=True)) < 1e-3
    assert greedy(client, f"{F32}-bent-mlx") == greedy(client, f"{F32}-bent") != greedy(client, F32)


def test_adapters_run_on_the_bases_runner(lora_server: Server) -> None:
    client = lora_server.client()
    base = first_logprobs(client, F32)
    tiny = first_logprobs(client, f"{F32}-tiny")
    assert len(base) == len(tiny) == 4
    # Not equal: the KV cache holds F16, whose rounding a change of 1e-6 can tip.
    assert max(abs(ours - theirs) for ours, theirs in zip(base, tiny, strict=True)) < 2e-2
    plain = greedy(client, SMOL)
    assert "Paris" in plain
    loud = greedy(client, f"{SMOL}-loud")
    assert loud != plain and "Paris" not in loud
    assert greedy(client, SMOL) == plain  # the base is itself again after an adapter ran
    engine = lora_server.engine_health()["engine"]
    assert sorted(engine["loaded_models"]) == sorted([SMOL, F32])  # type: ignore[index]


def test_requests_for_different_adapters_keep_their_own_weights(lora_server: Server) -> None:
    """Requests for the base and two adapters at once: each reply is the one it gets alone."""
    client = lora_server.client()
    models = [SMOL, f"{SMOL}-bent", f"{SMOL}-loud"]
    alone = {model: greedy(client, model) for model in models}
    assert len(set(alone.values())) == 3
    got: dict[int, str] = {}

    def ask(index: int) -> None:
        try:
            got[index] = greedy(lora_server.client(), models[index % 3])
        except openai.OpenAIError as exc:
            got[index] = repr(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert {i: got.get(i) for i in range(6)} == {i: alone[models[i % 3]] for i in range(6)}


def test_merged_adapter_answers_as_the_adapter_does(lora_server: Server) -> None:
    adapter = f"{F32}-bent"
    done = run_cli(lora_server, "merge", adapter, "--type", "f32")
    assert done.returncode == 0, done.stderr
    merged = lora_server.models_dir / f"{adapter}-merged.gguf"
    with pytest.raises(lora.AdapterError):
        lora.read(merged)  # a model, not an adapter
    client = lora_server.client()
    served = greedy(client, adapter)
    assert served != greedy(client, F32)
    assert greedy(client, f"{adapter}-merged") == served
    deltas = np.abs(np.array(first_logprobs(client, f"{adapter}-merged")) - first_logprobs(client, adapter))
    assert deltas.max() < 2e-2
    refused = run_cli(lora_server, "merge", SMOL)
    assert refused.returncode == 1 and "not a LoRA adapter" in refused.stderr


def test_merging_into_a_quantized_base_adds_the_delta(tmp_path: Path, smollm2_path: Path) -> None:
    pairs = random_pairs(6, 0.3, range(29, 30))
    adapter = peft.convert(peft_folder(tmp_path / "p", pairs, r=4, alpha=4), smollm2_path, SMOL)
    assert lora.merge(smollm2_path, adapter, tmp_path / "m.gguf", "f16") == len(pairs)
    name = "blk.29.attn_v.weight"
    merged = base_weight(tmp_path / "m.gguf", name)
    expected = base_weight(smollm2_path, name) + adapter.delta(name)
    np.testing.assert_allclose(merged, expected, atol=2e-3)
    assert (
        base_weight(tmp_path / "m.gguf", "blk.0.attn_v.weight").tolist()
        == base_weight(smollm2_path, "blk.0.attn_v.weight").tolist()
    )


def test_an_adapter_whose_base_is_gone_is_a_404(lora_server: Server, tmp_path: Path) -> None:
    adapter = lora.read(lora_server.models_dir / f"{F32}-tiny.gguf")
    adapter.base = "no-such-base"
    lora.write(lora_server.models_dir / "orphan.gguf", adapter)
    try:
        listed(lora_server, "orphan")
        with pytest.raises(openai.NotFoundError) as caught:
            greedy(lora_server.client(), "orphan")
        assert caught.value.body["param"] == "model"  # type: ignore[index]
        assert "no-such-base" in caught.value.message
    finally:
        os.unlink(lora_server.models_dir / "orphan.gguf")


def test_a_replaced_adapter_is_loaded_again(lora_server: Server) -> None:
    """A model replaced under the same name: the runner notices the new file and loads it."""
    client = lora_server.client()
    swap = lora_server.models_dir / "swap.gguf"
    try:
        lora.write(swap, lora.read(lora_server.models_dir / f"{SMOL}-loud.gguf"))
        listed(lora_server, "swap")
        assert greedy(client, "swap") == greedy(client, f"{SMOL}-loud")
        lora.write(swap, lora.read(lora_server.models_dir / f"{SMOL}-bent.gguf"))
        assert greedy(client, "swap") == greedy(client, f"{SMOL}-bent")
    finally:
        swap.unlink(missing_ok=True)


def test_extract_keeps_the_top_singular_directions_of_what_changed(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    weights = {
        "blk.0.attn_q.weight": rng.standard_normal((12, 8)).astype(np.float32),
        "blk.0.attn_v.weight": rng.standard_normal((6, 8)).astype(np.float32),
        "blk.0.attn_norm.weight": np.ones(8, np.float32),
    }
    change = (rng.standard_normal((12, 2)) @ rng.standard_normal((2, 8))).astype(np.float32)
    tuned = {**weights, "blk.0.attn_q.weight": weights["blk.0.attn_q.weight"] + change}
    tuned["blk.0.attn_norm.weight"] = weights["blk.0.attn_norm.weight"] * 2  # a vector: not kept
    for name, tensors in (("base", weights), ("tuned", tuned)):
        writer = gguf.GGUFWriter(tmp_path / f"{name}.gguf", arch="llama")
        for key, value in tensors.items():
            writer.add_tensor(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    exact = lora.extract(tmp_path / "base.gguf", tmp_path / "tuned.gguf", 2, SMOL)
    assert set(exact.pairs) == {"blk.0.attn_q.weight"} and exact.base == SMOL and exact.alpha == 0
    np.testing.assert_allclose(exact.delta("blk.0.attn_q.weight"), change, atol=1e-4)
    one = lora.extract(tmp_path / "base.gguf", tmp_path / "tuned.gguf", 1, SMOL)
    u, s, vt = np.linalg.svd(change)
    np.testing.assert_allclose(one.delta("blk.0.attn_q.weight"), s[0] * np.outer(u[:, 0], vt[0]), atol=1e-4)
