"""MLX-LM (Apple's MLX): LoRA with ``python -m mlx_lm lora --config FILE``.

The config is the YAML that ``mlx_lm lora --config`` reads (the keys of its
``CONFIG_DEFAULTS`` in ``mlx_lm/lora.py``); ``data`` is a folder with ``train.jsonl`` and
``valid.jsonl``, whose ``{"messages": [...]}`` lines MLX-LM renders with the model's own
chat template. MLX-LM counts iterations, not epochs: ``iters`` is one pass over the
training examples per epoch at batch size 1. It runs on Apple silicon (Metal) and, with
``mlx[cpu]``, on Linux CPUs (slowly).

Output: ``<output>/adapter/adapters.safetensors`` and ``adapter_config.json``.
``mlx_lm fuse --model BASE --adapter-path <output>/adapter --export-gguf`` can write a GGUF,
but only for the llama, mistral and mixtral model types, as F16, and with the vocabulary
written as SentencePiece (``tokenizer.ggml.model = llama``), which is wrong for byte-level
BPE models such as SmolLM2 or Llama 3; locopilot does not run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from locopilot.training.adapters.base import ExternalJob, Plan, offline_env, yaml_text

CONFIG_NAME = "mlx-lora.yaml"
#: A training report in ``mlx_lm lora``'s output (0.32): a row of its table, ``iter``,
#: ``train_loss`` and a trend arrow, ``tok/s``, ``tokens`` (``  18    5.752 ▼    1,711      0.5k``).
PROGRESS = r"^\s*(?P<step>\d+)\s+(?P<loss>\d+\.\d+)\s+\S*\s+(?P<tokens_per_s>[\d,]+)\s+[\d.]+k\s*$"


class MLXLM:
    name: ClassVar[str] = "mlx"
    module: ClassVar[str] = "mlx_lm"
    distribution: ClassVar[str] = "mlx-lm"
    needs: ClassVar[str] = "Apple silicon, or mlx[cpu] on Linux (slow)"

    def plan(self, job: ExternalJob, work_dir: Path, python: str) -> Plan:
        data_dir = str(Path(job.train_file).parent)
        config: dict[str, object] = {
            "model": job.base_model,
            "train": True,
            "data": data_dir,
            "fine_tune_type": "lora",
            "optimizer": job.optimizer,
            "num_layers": job.layers or -1,  # -1: every layer
            "batch_size": job.batch_size,
            "iters": job.steps,
            "learning_rate": job.learning_rate,
            "max_seq_length": job.context,
            "seed": job.seed,
            "lora_parameters": {"rank": job.lora_rank, "dropout": 0.0, "scale": 20.0},
            "adapter_path": job.adapter_dir,
            "save_every": job.steps,
            "steps_per_report": max(1, job.steps // 20),
            "steps_per_eval": job.steps,  # one validation, at the end
            "val_batches": -1,  # the whole validation set
            "grad_checkpoint": False,
        }
        return Plan(
            argv=[python, "-m", "mlx_lm", "lora", "--config", str(work_dir / CONFIG_NAME)],
            files={CONFIG_NAME: yaml_text(config)},
            adapter_dir=job.adapter_dir,
            env=offline_env(job),
            steps=job.steps,
            progress=PROGRESS,
        )
