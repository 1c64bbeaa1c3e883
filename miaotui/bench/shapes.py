"""Random-weight models in real shapes, for speed measurements without downloads.

``shape_dir("smollm2-135m")`` writes (once) a Hugging Face directory: config.json, a
safetensors file of seeded random bfloat16 weights and a byte-level tokenizer whose
vocabulary is padded to the model's size, under ``~/.cache/miaotui/shapes/NAME``.
Speed depends only on the shapes, so these stand in for the real checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=2048),
}
BOS_ID, EOS_ID = 256, 257   # right after the 256 byte tokens


def cache_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "miaotui", "shapes")


def resolve_model(model: str | None) -> str | None:
    """A shape name ("smollm2-135m" or "shape:smollm2-135m") becomes its directory."""
    if model is None:
        return None
    name = model.removeprefix("shape:")
    return shape_dir(name) if name in SHAPES else model


def shape_dir(name: str, root: str | None = None, seed: int = 0) -> str:
    """The directory of shape `name`, created on first use."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r} (known: {', '.join(SHAPES)})")
    path = os.path.join(root or cache_root(), name)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cfg = hf_config(name)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    write_random_weights(cfg, os.path.join(tmp, "model.safetensors"), seed)
    write_padded_tokenizer(tmp, cfg["vocab_size"])
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)   # atomic: a half-written directory is never used
    return path


def hf_config(name: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
            "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
            **SHAPES[name]}


def write_random_weights(cfg: dict, file: str, seed: int = 0) -> None:
    """Llama-layout weights ~ N(0, 0.02), norms 1, stored as bfloat16."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rand(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)),
                            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))]:
            t[p + name + ".weight"] = rand(*shape)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(t, file, metadata={"format": "pt"})


def write_padded_tokenizer(path: str, vocab_size: int) -> None:
    """Byte-level tokenizer: 256 byte tokens, <s>, </s>, then inert filler tokens
    ("<x300>", never produced by encoding) so every model id decodes to something."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = BOS_ID, EOS_ID
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
