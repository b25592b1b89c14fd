"""Axolotl: LoRA with ``python -m axolotl.cli.train CONFIG`` (what ``axolotl train`` and
``accelerate launch -m axolotl.cli.train`` run).

The config is Axolotl's YAML (its pydantic schema, ``axolotl.utils.schemas.config``): one
``chat_template`` dataset per split read from local JSONL (``ds_type: json``), rendered with
the tokenizer's own chat template (``chat_template: tokenizer_default``), LoRA on every
linear layer of the chosen blocks (``peft_layers_to_transform``). Axolotl needs PyTorch and,
in practice, an NVIDIA or AMD GPU.

Output: PEFT's ``adapter_model.safetensors`` and ``adapter_config.json`` in ``<output>/adapter``;
``axolotl merge-lora CONFIG`` merges it into the base (``<output>/adapter/merged``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from locopilot.training.adapters.base import ExternalJob, Plan, layer_indices, offline_env, yaml_text

CONFIG_NAME = "axolotl.yaml"
#: Hugging Face's names (transformers.training_args.OptimizerNames).
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}


def _dataset(path: str) -> dict[str, object]:
    return {
        "path": path,
        "ds_type": "json",
        "split": "train",  # a JSON file loads as one split named train
        "type": "chat_template",
        "field_messages": "messages",
        "message_property_mappings": {"role": "role", "content": "content"},
    }


class Axolotl:
    name: ClassVar[str] = "axolotl"
    module: ClassVar[str] = "axolotl"
    distribution: ClassVar[str] = "axolotl"
    needs: ClassVar[str] = "PyTorch with an NVIDIA or AMD GPU"

    def plan(self, job: ExternalJob, work_dir: Path, python: str) -> Plan:
        config: dict[str, object] = {
            "base_model": job.base_model,
            "chat_template": "tokenizer_default",
            "datasets": [_dataset(job.train_file)],
            "dataset_prepared_path": str(work_dir / "prepared"),
            "output_dir": job.adapter_dir,
            "adapter": "lora",
            "lora_r": job.lora_rank,
            "lora_alpha": 2 * job.lora_rank,
            "lora_dropout": 0.0,
            "lora_target_linear": True,
            "sequence_len": job.context,
            "sample_packing": False,
            "micro_batch_size": job.batch_size,
            "gradient_accumulation_steps": 1,
            "num_epochs": job.epochs,
            "learning_rate": job.learning_rate,
            "optimizer": OPTIMIZERS[job.optimizer],
            "lr_scheduler": "linear",
            "seed": job.seed,
            "logging_steps": 1,
            "save_safetensors": True,
        }
        layers = layer_indices(job)
        if layers is not None:
            config["peft_layers_to_transform"] = layers
        if job.valid_file:
            config["test_datasets"] = [_dataset(job.valid_file)]
        else:
            config["val_set_size"] = 0.0
        return Plan(
            argv=[python, "-m", "axolotl.cli.train", str(work_dir / CONFIG_NAME)],
            files={CONFIG_NAME: yaml_text(config)},
            adapter_dir=job.adapter_dir,
            env={"AXOLOTL_DO_NOT_TRACK": "1"} | offline_env(job),
            steps=job.steps,
        )
