"""External training frameworks: rendered configs, the data they read, the subprocess path, doctor.

Three layers, cheapest first:

1. Plans rendered from a job, checked field by field, and the YAML read back with PyYAML.
2. The whole ``locopilot train --framework`` path run against a stand-in Python
   (tests/frameworks/standin.py) that parses the command lines as the real programs do.
3. The real frameworks, where `just framework-envs` has made their environments (skipped
   otherwise, saying so): MLX-LM trains a tiny generated model on the CPU; Axolotl's own
   loader validates and normalizes the rendered config; the generated Unsloth script trains
   with TRL and PEFT, Unsloth's two calls stood in for (Unsloth itself needs a GPU).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.training.adapters import FRAMEWORKS, preference
from locopilot.training.adapters.axolotl import Axolotl
from locopilot.training.adapters.base import (
    ExternalJob,
    FrameworkFailed,
    layer_indices,
    prepare_data,
    probe,
    yaml_text,
)
from locopilot.training.adapters.mlx_lm import MLXLM
from locopilot.training.adapters.unsloth import SCRIPT, Unsloth
from locopilot.training.peft import hf_pairs, read_safetensors
from tests.conftest import ROOT
from tests.test_cli import make_env
from tests.test_training import facts_dataset

MLX_ENV = ROOT / ".cache" / "frameworks"  # `just framework-envs`: mlx[cpu] and mlx-lm
TORCH_ENV = ROOT / ".cache" / "axolotl-check"  # PyTorch (CPU), transformers, PEFT, TRL, Axolotl without its GPU parts
FRAMEWORK_DIR = Path(__file__).parent / "frameworks"


def hf_model(folder: Path, layers: int = 4) -> Path:
    """A folder that looks like a Hugging Face model to locopilot (config.json only)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return folder


def job(tmp_path: Path, **overrides: Any) -> ExternalJob:
    data = prepare_data(facts_dataset(tmp_path / "facts.jsonl"), tmp_path / "work", validation_split=0.2, seed=0)
    values: dict[str, Any] = {
        "base_model": str(hf_model(tmp_path / "base")),
        "train_file": data.train_file,
        "valid_file": data.valid_file,
        "train_examples": data.train_examples,
        "output_dir": str(tmp_path / "out"),
        "epochs": 2,
        "learning_rate": 2e-4,
        "layers": 2,
        "lora_rank": 4,
    }
    return ExternalJob(**(values | overrides))


def test_yaml_text_reads_back_equal_with_pyyaml() -> None:
    value: dict[str, object] = {
        "learning_rate": 1e-05,
        "small": 2.5e-7,
        "plain": 0.1,
        "big": 1e22,
        "count": 3,
        "flag": True,
        "nothing": None,
        "text": 'a: "quoted" # not a comment\nsecond line',
        "unicode": "Zürich ✓",
        "nested": {"rank": 8, "scale": 20.0, "empty": {}},
        "items": [{"path": "/a b/train.jsonl", "type": "chat_template", "map": {"role": "role"}}, 1, "x"],
        "empty": [],
    }
    assert yaml.safe_load(yaml_text(value)) == value


def test_prepare_data_writes_chat_jsonl_and_holds_examples_out(tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n" for i in range(20)), encoding="utf-8"
    )
    data = prepare_data(alpaca, tmp_path / "work", validation_split=0.25, seed=3)
    train = [json.loads(line) for line in Path(data.train_file).read_text().splitlines()]
    assert data.valid_file is not None
    valid = [json.loads(line) for line in Path(data.valid_file).read_text().splitlines()]
    assert (data.train_examples, data.valid_examples, len(train), len(valid)) == (15, 5, 15, 5)
    assert train[0]["messages"][0]["role"] == "user" and train[0]["messages"][-1]["role"] == "assistant"
    said = {m["messages"][0]["content"] for m in train + valid}
    assert said == {f"Say {i}." for i in range(20)}, "every example is in exactly one split"
    again = prepare_data(alpaca, tmp_path / "again", validation_split=0.25, seed=3)
    assert again.valid_file and Path(again.valid_file).read_text() == Path(data.valid_file).read_text()
    none_held = prepare_data(alpaca, tmp_path / "work", validation_split=0.0, seed=3)
    assert none_held.valid_file is None and not (tmp_path / "work" / "data" / "valid.jsonl").exists()


def test_prepare_data_refuses_an_invalid_dataset(tmp_path: Path) -> None:
    from locopilot.training.datasets import DatasetInvalid

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "no question"}]}\n' * 12)
    with pytest.raises(DatasetInvalid):
        prepare_data(bad, tmp_path / "work", validation_split=0.1, seed=0)


def test_layer_indices_come_from_the_local_config(tmp_path: Path) -> None:
    assert layer_indices(job(tmp_path, layers=2)) == [2, 3]
    assert layer_indices(job(tmp_path, layers=9)) == [0, 1, 2, 3]
    assert layer_indices(job(tmp_path, layers=0)) is None
    with pytest.raises(FrameworkFailed, match="give a local model folder"):
        layer_indices(job(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", layers=2))
    assert layer_indices(job(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", layers=0)) is None


def test_mlx_plan(tmp_path: Path) -> None:
    j = job(tmp_path)
    plan = MLXLM().plan(j, tmp_path / "work", "/venv/bin/python")
    config_path = str(tmp_path / "work" / "mlx-lora.yaml")
    assert plan.argv == ["/venv/bin/python", "-m", "mlx_lm", "lora", "--config", config_path]
    config = yaml.safe_load(plan.files["mlx-lora.yaml"])
    assert config["model"] == j.base_model and config["train"] is True
    assert Path(config["data"], "train.jsonl") == Path(j.train_file)
    assert config["iters"] == j.train_examples * 2  # two epochs at batch size 1
    assert config["num_layers"] == 2 and config["lora_parameters"]["rank"] == 4
    assert config["learning_rate"] == 2e-4 and isinstance(config["learning_rate"], float)
    assert config["adapter_path"] == str(tmp_path / "out" / "adapter") == plan.adapter_dir
    assert plan.env["HF_HUB_OFFLINE"] == "1", "a local base: nothing is fetched"
    every = yaml.safe_load(MLXLM().plan(job(tmp_path, layers=0), tmp_path / "work", "p").files["mlx-lora.yaml"])
    assert every["num_layers"] == -1
    remote = MLXLM().plan(job(tmp_path, base_model="org/model", layers=0), tmp_path / "work", "p")
    assert "HF_HUB_OFFLINE" not in remote.env


def test_axolotl_plan(tmp_path: Path) -> None:
    j = job(tmp_path, optimizer="sgd")
    plan = Axolotl().plan(j, tmp_path / "work", "/venv/bin/python")
    assert plan.argv == ["/venv/bin/python", "-m", "axolotl.cli.train", str(tmp_path / "work" / "axolotl.yaml")]
    config = yaml.safe_load(plan.files["axolotl.yaml"])
    assert config["base_model"] == j.base_model and config["adapter"] == "lora"
    assert config["datasets"][0]["path"] == j.train_file and config["datasets"][0]["type"] == "chat_template"
    assert config["test_datasets"][0]["path"] == j.valid_file and "val_set_size" not in config
    assert config["peft_layers_to_transform"] == [2, 3]
    assert (config["optimizer"], config["num_epochs"], config["sequence_len"]) == ("sgd", 2, 256)
    assert plan.env["AXOLOTL_DO_NOT_TRACK"] == "1"
    whole_plan = Axolotl().plan(job(tmp_path, valid_file=None, layers=0), tmp_path, "p")
    whole = yaml.safe_load(whole_plan.files["axolotl.yaml"])
    assert whole["val_set_size"] == 0.0 and "test_datasets" not in whole and "peft_layers_to_transform" not in whole


def test_unsloth_plan_gives_the_script_every_value_it_reads(tmp_path: Path) -> None:
    import re

    plan = Unsloth().plan(job(tmp_path), tmp_path / "work", "/venv/bin/python")
    script, job_file = tmp_path / "work" / "unsloth_train.py", tmp_path / "work" / "unsloth-job.json"
    assert plan.argv == ["/venv/bin/python", str(script), str(job_file)]
    compile(plan.files["unsloth_train.py"], "unsloth_train.py", "exec")
    values = json.loads(plan.files["unsloth-job.json"])
    read = set(re.findall(r'job\["(\w+)"\]', SCRIPT))
    assert read and read <= set(values), read - set(values)
    assert values["layers_to_transform"] == [2, 3] and values["optim"] == "adamw_torch"


def test_probe_finds_importable_modules_only() -> None:
    found = probe(sys.executable, {"json": "no-such-distribution", "msgspec": "msgspec", "no_such_module_x": "x"})
    assert found == {"json": "", "msgspec": msgspec.__version__}
    with pytest.raises(FrameworkFailed, match="cannot run"):
        probe("/nonexistent/python", {"json": "json"})


def test_preference_puts_mlx_first_on_apple_silicon_only() -> None:
    assert preference("darwin", "arm64")[0] == "mlx"
    assert preference("linux", "x86_64")[0] != "mlx"
    assert sorted(preference("linux", "x86_64")) == sorted(FRAMEWORKS)


# The subprocess path, against the stand-in Python.


def standin(tmp_path: Path, installed: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """An executable stand-in Python and the environment it reads; ``installed``: distribution → version."""
    site = tmp_path / "standin-site"
    for module, version in installed.items():
        (site / module).mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
        dist = site / f"{module}-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n")
    exe = tmp_path / "standin-python"
    script = str(FRAMEWORK_DIR / "standin.py")
    exe.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({script!r}, run_name='__main__')\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    env = {"STANDIN_SITE": str(site), "STANDIN_LOG": str(tmp_path / "standin.log")}
    return exe, env


def train_cli(tmp_path: Path, args: list[str], env: dict[str, str]) -> Any:
    return CliRunner().invoke(cli, ["train", *args], env=make_env(tmp_path) | env)


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_cli_runs_each_framework_with_its_command_line(tmp_path: Path, framework: str) -> None:
    module = FRAMEWORKS[framework].module
    exe, env = standin(tmp_path, {module: "1.2.3"})
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    base = hf_model(tmp_path / "tiny-llama")
    args = ["--framework", framework, "--python", str(exe), "--base", str(base), "--dataset", str(dataset)]
    result = train_cli(tmp_path, [*args, "--epochs", "2", "--layers", "1"], env)
    assert result.exit_code == 0, result.output + result.stderr
    assert "trained a LoRA adapter in" in result.output
    runs = [json.loads(line) for line in (tmp_path / "standin.log").read_text().splitlines()]
    assert runs[0][:2] == ["-I", "-c"], "the probe comes first"
    assert len(runs) == 2
    adapters = list((tmp_path / "data" / "training").glob(f"tiny-llama-{framework}-*/adapter/adapter_config.json"))
    assert len(adapters) == 1
    written = json.loads(adapters[0].read_text())
    assert json.dumps(written).count(str(base)) >= 1


def test_cli_reports_a_failed_framework_run(tmp_path: Path) -> None:
    exe, env = standin(tmp_path, {"mlx_lm": "0.32.2"})
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    base = hf_model(tmp_path / "m")
    args = ["--framework", "mlx", "--python", str(exe), "--base", str(base), "--dataset", str(dataset)]
    result = train_cli(tmp_path, args, env | {"STANDIN_EXIT": "3"})
    assert result.exit_code == 1
    assert "exited with status 3" in result.stderr
    log = next((tmp_path / "data" / "training").glob("m-mlx-*/mlx.log"))
    assert "failing as asked" in log.read_text()


def test_cli_refuses_a_framework_that_is_not_installed(tmp_path: Path) -> None:
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    args = ["--framework", "axolotl", "--python", sys.executable, "--base", str(hf_model(tmp_path / "m"))]
    result = train_cli(tmp_path, [*args, "--dataset", str(dataset)], {})
    assert result.exit_code == 1
    assert "axolotl is not installed for" in result.stderr and "GPU" in result.stderr


def test_cli_refuses_a_gguf_base_for_a_framework(tmp_path: Path, smollm2_path: Path) -> None:
    exe, env = standin(tmp_path, {"mlx_lm": "0.32.2"})
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    args = ["--framework", "mlx", "--python", str(exe), "--base", str(smollm2_path), "--dataset", str(dataset)]
    result = train_cli(tmp_path, args, env)
    assert result.exit_code == 1
    assert "train Hugging Face models" in result.stderr and "not GGUF" in result.stderr


def test_cli_dry_run_writes_the_config_and_runs_nothing(tmp_path: Path) -> None:
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    args = ["--framework", "axolotl", "--python", "/nonexistent/python", "--base", str(hf_model(tmp_path / "m"))]
    result = train_cli(tmp_path, [*args, "--dataset", str(dataset), "--dry-run"], {})
    assert result.exit_code == 0, result.output + result.stderr
    assert "/nonexistent/python -m axolotl.cli.train" in result.output.replace("\n", "")
    config = next((tmp_path / "data" / "training").glob("m-axolotl-*/work/axolotl.yaml"))
    assert yaml.safe_load(config.read_text())["base_model"] == str(tmp_path / "m")


def test_doctor_lists_the_installed_frameworks(tmp_path: Path) -> None:
    from locopilot.cli.doctor import check_training_frameworks
    from locopilot.settings import load_settings

    exe, env = standin(tmp_path, {"mlx_lm": "0.32.2"})
    os.environ.update(env)  # the stand-in reads them; doctor passes its own environment on
    try:
        settings = load_settings({"LOCOPILOT_TRAINING_PYTHON": str(exe), "LOCOPILOT_DATA_DIR": str(tmp_path)})
        check = check_training_frameworks(settings)
    finally:
        for key in env:
            os.environ.pop(key)
    assert check.status == "ok"
    assert "mlx 0.32.2" in check.detail and "not installed: unsloth, axolotl" in check.detail
    missing = check_training_frameworks(load_settings({"LOCOPILOT_TRAINING_PYTHON": "/nonexistent/python"}))
    assert missing.status == "warn" and "/nonexistent/python" in missing.detail


# The real frameworks, in their own environments.

needs_mlx = pytest.mark.skipif(
    not (MLX_ENV / "bin" / "mlx_lm.lora").exists(), reason="no MLX-LM environment (`just framework-envs`)"
)
needs_torch = pytest.mark.skipif(
    not (TORCH_ENV / "bin" / "python").exists(), reason="no PyTorch/Axolotl environment (`just framework-envs`)"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama with a byte-level BPE tokenizer and a ChatML template, made by MLX's Python."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    python = MLX_ENV / "bin" / "python" if (MLX_ENV / "bin" / "python").exists() else TORCH_ENV / "bin" / "python"
    subprocess.run([str(python), str(FRAMEWORK_DIR / "tiny_model.py"), str(folder)], check=True, timeout=300)
    return folder


@needs_mlx
@pytest.mark.slow
def test_mlx_lm_trains_a_lora_adapter_for_real(tmp_path: Path, tiny_model: Path) -> None:
    python = str(MLX_ENV / "bin" / "python")
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    args = ["--framework", "mlx", "--python", python, "--base", str(tiny_model), "--dataset", str(dataset)]
    result = train_cli(tmp_path, [*args, "--layers", "1", "--lora-rank", "4", "--optimizer", "sgd"], {})
    assert result.exit_code == 0, result.output + result.stderr
    out = next((tmp_path / "data" / "training").glob("tiny-llama-mlx-*"))
    log = (out / "mlx.log").read_text()
    assert "Trainable parameters" in log and "val" in log
    assert (out / "adapter" / "adapters.safetensors").stat().st_size > 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())  # MLX-LM's own record of its args
    assert (saved["num_layers"], saved["lora_parameters"]["rank"], saved["optimizer"]) == (1, 4, "sgd")
    assert saved["iters"] == 27 and saved["max_seq_length"] == 256  # 30 examples, 3 held out, one epoch
    # Every key locopilot writes is one MLX-LM knows (it ignores unknown keys silently).
    config = yaml.safe_load((out / "work" / "mlx-lora.yaml").read_text())
    known = subprocess.run(
        [python, "-c", "import json; from mlx_lm.lora import CONFIG_DEFAULTS as d; print(json.dumps(sorted(d)))"],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert set(config) <= set(json.loads(known.stdout)), set(config) - set(json.loads(known.stdout))
    # locopilot reads the adapter as MLX-LM's own fuse applies it: the fused weights minus the base's.
    fused = tmp_path / "fused"
    fuse = ["fuse", "--model", str(tiny_model), "--adapter-path", str(out / "adapter"), "--save-path", str(fused)]
    subprocess.run(
        [python, "-m", "mlx_lm", *fuse],
        check=True,
        capture_output=True,
        timeout=300,
    )
    base, merged = read_safetensors(tiny_model / "model.safetensors"), read_safetensors(fused / "model.safetensors")
    pairs = hf_pairs(out / "adapter")
    assert len(pairs) == 7  # every projection of the one trained block
    for (block, module), (a, b) in pairs.items():
        name = f"model.layers.{block}.{module}.weight"
        delta = merged[name] - base[name]
        assert np.abs(delta).max() > 1e-6, name
        np.testing.assert_allclose(b @ a, delta, rtol=0, atol=1e-7)


@needs_torch
@pytest.mark.slow
def test_axolotl_accepts_the_rendered_config(tmp_path: Path, tiny_model: Path) -> None:
    j = job(tmp_path, base_model=str(tiny_model), layers=1)
    plan = Axolotl().plan(j, tmp_path / "work", str(TORCH_ENV / "bin" / "python"))
    config = tmp_path / "work" / "axolotl.yaml"
    config.write_text(plan.files["axolotl.yaml"])
    # Axolotl's own loader: its pydantic schema, then normalize_config (which reads the base's config.json).
    check = (
        "import json, sys; from axolotl.cli.config import load_cfg; c = load_cfg(sys.argv[1]); "
        "print(json.dumps({k: str(c[k]) for k in ('optimizer', 'peft_layers_to_transform', 'sequence_len', "
        "'num_epochs', 'lora_r', 'learning_rate', 'chat_template', 'base_model_config')}))"
    )
    env = {**os.environ, **plan.env, "DO_NOT_TRACK": "1"}
    result = subprocess.run(
        [str(TORCH_ENV / "bin" / "python"), "-c", check, str(config)], capture_output=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    seen = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert seen["optimizer"] == "adamw_torch" and seen["peft_layers_to_transform"] == "[1]"
    assert (seen["sequence_len"], seen["num_epochs"], seen["lora_r"]) == ("256", "2.0", "4")
    assert seen["base_model_config"] == str(tiny_model)


@needs_torch
@pytest.mark.slow
def test_axolotl_trains_on_the_cpu_for_real(tmp_path: Path, tiny_model: Path) -> None:
    """The rendered config, run by Axolotl itself; only its Triton LoRA kernels (CUDA-only) are turned off."""
    from locopilot.training.adapters.base import run

    j = job(tmp_path, base_model=str(tiny_model), layers=1, epochs=1)
    plan = Axolotl().plan(j, tmp_path / "work", str(TORCH_ENV / "bin" / "python"))
    cpu = "".join(f'"lora_{name}_kernel": false\n' for name in ("mlp", "qkv", "o"))
    plan = msgspec.structs.replace(plan, files={"axolotl.yaml": plan.files["axolotl.yaml"] + cpu})
    try:
        with (tmp_path / "axolotl.log").open("wb") as log:
            run(plan, tmp_path / "work", log)
    except FrameworkFailed:
        print((tmp_path / "axolotl.log").read_text()[-5000:])
        raise
    log_text = (tmp_path / "axolotl.log").read_text()
    assert "Training completed" in log_text and f"{j.train_examples}/{j.train_examples}" in log_text
    adapter = json.loads((Path(plan.adapter_dir) / "adapter_config.json").read_text())  # PEFT's, written by Axolotl
    assert adapter["r"] == 4 and adapter["layers_to_transform"] == [1]
    assert (Path(plan.adapter_dir) / "adapter_model.safetensors").stat().st_size > 0
    assert "posthog" not in log_text.lower(), "telemetry stays off"


@needs_torch
@pytest.mark.slow
def test_the_unsloth_script_trains_with_trl(tmp_path: Path, tiny_model: Path) -> None:
    from locopilot.training.adapters.base import run

    j = job(tmp_path, base_model=str(tiny_model), layers=1, epochs=1)
    plan = Unsloth().plan(j, tmp_path / "work", str(TORCH_ENV / "bin" / "python"))
    os.environ["PYTHONPATH"] = str(FRAMEWORK_DIR / "fake_unsloth")  # Unsloth's two calls, stood in for
    try:
        with (tmp_path / "unsloth.log").open("wb") as log:
            run(plan, tmp_path / "work", log)
    except FrameworkFailed:
        print((tmp_path / "unsloth.log").read_text()[-5000:])
        raise
    finally:
        os.environ.pop("PYTHONPATH")
    result = json.loads((tmp_path / "unsloth.log").read_text().strip().splitlines()[-1])
    assert result["steps"] == j.train_examples and result["train_loss"] > 0
    adapter = json.loads((Path(plan.adapter_dir) / "adapter_config.json").read_text())  # PEFT's
    assert adapter["r"] == 4 and adapter["layers_to_transform"] == [1]
    assert (Path(plan.adapter_dir) / "adapter_model.safetensors").stat().st_size > 0


def test_a_framework_runs_without_the_bundles_library_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the one-file binary, another Python gets the library path it would have had, no _PYI_* and no settings."""
    from locopilot.training.adapters.base import foreign_environment

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEIbundle:/opt/lib")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/opt/lib")
    monkeypatch.setenv("_PYI_APPLICATION_HOME_DIR", "/tmp/_MEIbundle")
    monkeypatch.setenv("LOCOPILOT_ADMIN_KEY", "secret")
    env = foreign_environment()
    assert env["LD_LIBRARY_PATH"] == "/opt/lib"
    assert not {"LD_LIBRARY_PATH_ORIG", "_PYI_APPLICATION_HOME_DIR", "LOCOPILOT_ADMIN_KEY"} & set(env)
    monkeypatch.delenv("LD_LIBRARY_PATH_ORIG")
    assert "LD_LIBRARY_PATH" not in foreign_environment()  # the bootloader made it; nothing to restore
