"""A stand-in for the two Unsloth calls locopilot's generated script makes, on plain transformers and PEFT.

Real Unsloth raises at import without a GPU, so the script is tested with this on the CPU:
everything else it does (datasets, TRL's SFTTrainer, saving the adapter) runs for real.
The signatures are Unsloth's (``unsloth/models/llama.py``), without ``**kwargs``, so a
keyword Unsloth does not take fails here too.
"""

from __future__ import annotations

from typing import Any


def is_bfloat16_supported() -> bool:
    return False


class FastLanguageModel:
    @staticmethod
    def from_pretrained(
        model_name: str = "unsloth/Llama-3.2-1B-Instruct",
        max_seq_length: int | None = None,
        dtype: Any = None,
        load_in_4bit: bool = True,
    ) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if load_in_4bit:
            raise ValueError("4-bit loading needs bitsandbytes and a GPU")
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype or torch.float32)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: Any,
        r: int = 16,
        target_modules: list[str] | None = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: list[int] | None = None,
        layers_pattern: str | None = None,
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
    ) -> Any:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(random_state)
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            target_modules=target_modules,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
