"""Unsloth: LoRA through a generated script run with the framework's own Python.

Unsloth has no training command; its documented use is a script: ``FastLanguageModel``
loads the base and adds LoRA weights, TRL's ``SFTTrainer`` trains on the conversations
rendered with the tokenizer's chat template. :data:`SCRIPT` is that script, the same for
every job; the job's values are in a JSON file beside it (nothing is pasted into code).
Importing Unsloth needs PyTorch with an NVIDIA, AMD or Intel GPU; it raises otherwise.

Output: PEFT's ``adapter_model.safetensors``, ``adapter_config.json`` and the tokenizer in
``<output>/adapter``. Unsloth's own ``save_pretrained_gguf`` fetches and builds llama.cpp
from GitHub, so locopilot does not call it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import msgspec

from locopilot.training.adapters.base import ExternalJob, Plan, layer_indices, offline_env

SCRIPT_NAME = "unsloth_train.py"
JOB_NAME = "unsloth-job.json"
#: Hugging Face's names (transformers.training_args.OptimizerNames).
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}

SCRIPT = '''\
"""Written by locopilot: fine-tune with Unsloth. Usage: python unsloth_train.py JOB.json"""

import json
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    job = json.load(f)

# Unsloth patches transformers and TRL, so it is imported first.
from unsloth import FastLanguageModel, is_bfloat16_supported

import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=job["base_model"],
    max_seq_length=job["context"],
    dtype=None,
    load_in_4bit=False,
)
model = FastLanguageModel.get_peft_model(
    model,
    r=job["lora_rank"],
    lora_alpha=2 * job["lora_rank"],
    lora_dropout=0,
    bias="none",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    layers_to_transform=job["layers_to_transform"],
    use_gradient_checkpointing="unsloth",
    random_state=job["seed"],
)

files = {"train": job["train_file"]}
if job["valid_file"]:
    files["validation"] = job["valid_file"]
data = load_dataset("json", data_files=files)
data = data.map(
    lambda example: {"text": tokenizer.apply_chat_template(example["messages"], tokenize=False)},
    remove_columns=["messages"],
)

bf16 = is_bfloat16_supported()
args = SFTConfig(
    output_dir=job["checkpoint_dir"],
    dataset_text_field="text",
    max_length=job["context"],
    per_device_train_batch_size=job["batch_size"],
    gradient_accumulation_steps=1,
    num_train_epochs=job["epochs"],
    learning_rate=job["learning_rate"],
    optim=job["optim"],
    lr_scheduler_type="linear",
    seed=job["seed"],
    bf16=bf16,
    fp16=torch.cuda.is_available() and not bf16,
    logging_steps=1,
    save_strategy="no",
    eval_strategy="epoch" if job["valid_file"] else "no",
    report_to="none",
)
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=data["train"],
    eval_dataset=data["validation"] if job["valid_file"] else None,
    args=args,
)
result = trainer.train()
model.save_pretrained(job["adapter_dir"])
tokenizer.save_pretrained(job["adapter_dir"])
print(json.dumps({"train_loss": result.training_loss, "steps": result.global_step}))
'''


class Unsloth:
    name: ClassVar[str] = "unsloth"
    module: ClassVar[str] = "unsloth"
    distribution: ClassVar[str] = "unsloth"
    needs: ClassVar[str] = "PyTorch with an NVIDIA, AMD or Intel GPU"

    def plan(self, job: ExternalJob, work_dir: Path, python: str) -> Plan:
        values = msgspec.structs.asdict(job) | {
            "layers_to_transform": layer_indices(job),
            "adapter_dir": job.adapter_dir,
            "checkpoint_dir": str(work_dir / "checkpoints"),
            "optim": OPTIMIZERS[job.optimizer],
        }
        return Plan(
            argv=[python, str(work_dir / SCRIPT_NAME), str(work_dir / JOB_NAME)],
            files={SCRIPT_NAME: SCRIPT, JOB_NAME: json.dumps(values, indent=2) + "\n"},
            adapter_dir=job.adapter_dir,
            env=offline_env(job),
            steps=job.steps,
        )
