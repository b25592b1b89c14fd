"""The tiny Llama of ``tiny_model.py`` as an F32 GGUF, as llama.cpp's ``convert_hf_to_gguf.py`` writes a
Llama (which needs PyTorch, so it is not run here): the same tensors under GGUF's names, q and k rows
permuted (:func:`locopilot.training.peft.permute`), the byte-level BPE vocabulary as ``gpt2`` tokens with
their merges, and the ChatML template. Runs in locopilot's own environment (``gguf``, numpy).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from locopilot.training.peft import MODULES, permute, read_safetensors

NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(folder: Path, path: Path) -> Path:
    """The Hugging Face model in ``folder`` (a ``tiny_model.py`` one) as the GGUF ``path``."""
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer["model"]["vocab"]
    special = {token["id"] for token in tokenizer["added_tokens"] if token["special"]}
    ids = sorted(vocab.values())
    assert ids == list(range(config["vocab_size"])), "a vocabulary without gaps"
    by_id = {index: token for token, index in vocab.items()}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # ByteLevel with GPT-2's split regex, as tiny_model.py builds it
    writer.add_token_list([by_id[index] for index in ids])
    writer.add_token_types([gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL for index in ids])
    writer.add_token_merges([" ".join(pair) for pair in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)  # the Hugging Face tokenizer adds none either
    writer.add_chat_template((folder / "chat_template.jinja").read_text())
    weights = read_safetensors(folder / "model.safetensors")
    writer.add_tensor("token_embd.weight", weights.pop("model.embed_tokens.weight"))
    writer.add_tensor("output_norm.weight", weights.pop("model.norm.weight"))
    for name, tensor in sorted(weights.items()):
        block, rest = name.removeprefix("model.layers.").split(".", 1)
        module = rest.removesuffix(".weight")
        if module in NORMS:
            writer.add_tensor(f"blk.{block}.{NORMS[module]}.weight", tensor)
            continue
        if module == "self_attn.q_proj":
            tensor = permute(tensor, heads)
        elif module == "self_attn.k_proj":
            tensor = permute(tensor, kv_heads)
        writer.add_tensor(f"blk.{block}.{MODULES[module]}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
