"""A stand-in for a framework's Python, for the subprocess path (``locopilot train --framework``).

It answers the three command lines locopilot runs the way the real programs parse them, and
fails (exit 2, a message on stderr) on anything they would refuse:

- ``-I -c CODE ARG`` (the probe): runs CODE with a folder of fake installed distributions
  first on ``sys.path`` (``STANDIN_SITE``), so ``find_spec`` and ``importlib.metadata``
  really find them;
- ``-m mlx_lm lora --config FILE``: the YAML must have the keys ``mlx_lm lora`` needs, a
  ``data`` folder with ``train.jsonl`` of ``{"messages": [...]}`` lines and a local model;
  writes ``adapters.safetensors`` and ``adapter_config.json`` to ``adapter_path``, and two
  rows of MLX-LM's report table (the middle step and the last) to stderr;
- ``-m axolotl.cli.train FILE`` and ``SCRIPT JOB.json`` (Unsloth): the same checks on
  Axolotl's YAML or the job file, then an adapter in ``output_dir``/``adapter_dir``.

``STANDIN_EXIT`` makes it fail after the checks with that status, as a crashed run would.
``STANDIN_CONTROL`` names a JSON file read at each run, for a server's runs that differ:
``{"exit": N}`` as STANDIN_EXIT; ``{"hang": PIDS_FILE}``: start a child (as a framework starts
data loader workers), write both process ids to PIDS_FILE, and wait to be killed.
Every command line it got is appended to ``STANDIN_LOG``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def fail(message: str) -> None:
    print(f"standin: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_data(path: Path) -> int:
    if not path.is_file():
        fail(f"no training data at {path}")
    lines = path.read_text().splitlines()
    for line in lines:
        record = json.loads(line)
        roles = [m["role"] for m in record["messages"]]
        if roles[-1] != "assistant" or "user" not in roles:
            fail(f"{path}: not a chat example: {line[:80]}")
    return len(lines)


def check_model(base: str) -> None:
    if not (Path(base) / "config.json").is_file():
        fail(f"{base} is not a local model folder")


def write_adapter(folder: Path, config: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapters.safetensors").write_bytes(b"\0" * 8)


def mlx(args: list[str]) -> None:
    if args[:2] != ["lora", "--config"] or len(args) != 3:
        fail(f"mlx_lm: expected lora --config FILE, got {args}")
    config = yaml.safe_load(Path(args[2]).read_text())
    for key, kind in {"model": str, "train": bool, "data": str, "iters": int, "learning_rate": float}.items():
        if not isinstance(config.get(key), kind):
            fail(f"mlx_lm: {key} must be a {kind.__name__}, got {config.get(key)!r}")
    if config["fine_tune_type"] not in ("lora", "dora", "full") or config["optimizer"] not in ("adamw", "sgd"):
        fail("mlx_lm: bad fine_tune_type or optimizer")
    check_model(config["model"])
    examples = check_data(Path(config["data"]) / "train.jsonl")
    write_adapter(Path(config["adapter_path"]), config | {"examples_seen": examples})
    # Two rows of mlx_lm lora's report table, as its console writes them (colors included).
    print("  iter   train_loss     tok/s     tokens", file=sys.stderr)
    for step, loss in ((max(1, config["iters"] // 2), 2.5), (config["iters"], 1.25)):
        print(
            f"  \x1b[38;5;244m{step:>4}\x1b[0m    \x1b[1;32m{loss:>5.3f} ▼\x1b[0m    1,234      0.5k", file=sys.stderr
        )


def axolotl(args: list[str]) -> None:
    if len(args) != 1:
        fail(f"axolotl: expected one config file, got {args}")
    config = yaml.safe_load(Path(args[0]).read_text())
    if os.environ.get("AXOLOTL_DO_NOT_TRACK") != "1":
        fail("axolotl: telemetry is on")
    check_model(config["base_model"])
    for dataset in config["datasets"]:
        check_data(Path(dataset["path"]))
    write_adapter(Path(config["output_dir"]), config)


def unsloth(script: Path, job_file: Path) -> None:
    if not script.read_text().startswith('"""Written by locopilot'):
        fail(f"{script} is not locopilot's Unsloth script")
    job = json.loads(job_file.read_text())
    check_model(job["base_model"])
    check_data(Path(job["train_file"]))
    write_adapter(Path(job["adapter_dir"]), job)


def main(argv: list[str]) -> None:
    with open(os.environ["STANDIN_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    if argv[:2] == ["-I", "-c"]:
        sys.path.insert(0, os.environ["STANDIN_SITE"])
        sys.argv = ["-c", *argv[3:]]
        exec(argv[2], {"__name__": "__main__"})
        return
    match argv:
        case ["-m", "mlx_lm", *rest]:
            mlx(rest)
        case ["-m", "axolotl.cli.train", *rest]:
            axolotl(rest)
        case [script, job_file] if script.endswith(".py"):
            unsloth(Path(script), Path(job_file))
        case _:
            fail(f"unexpected command line {argv}")
    control_file = os.environ.get("STANDIN_CONTROL")
    control = json.loads(Path(control_file).read_text()) if control_file and Path(control_file).is_file() else {}
    if "hang" in control:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(control["hang"]).write_text(json.dumps([os.getpid(), child.pid]))
        print("standin: hanging until killed", file=sys.stderr, flush=True)
        time.sleep(600)
    if code := int(control.get("exit", os.environ.get("STANDIN_EXIT", "0"))):
        print("standin: failing as asked", file=sys.stderr)
        raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
