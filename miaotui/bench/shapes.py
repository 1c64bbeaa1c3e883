"""Random-weight models in real shapes, for speed measurements without downloads.

``shape_dir("smollm2-135m")`` writes (once) a Hugging Face directory: config.json, a
safetensors file of seeded random bfloat16 weights and a byte-level tokenizer whose
vocabulary is padded to the model's size, under ``~/.cache/miaotui/shapes/NAME``.
Speed depends only on the shapes, so these stand in for the real checkpoints.
``config_dir`` is the same model without the weights file, for the engine's random
weights made on the device (load_format "dummy": a GPU fills 16 GB in milliseconds, where
writing and reading them back would cost minutes and the disk); ``RandomCheckpoint`` draws
them as the loader reads them, through the loading path (quantization at load included).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from miaotui.loader.hf import HFCheckpoint

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=2048),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, rope_theta=500000.0,
                      max_position_embeddings=8192),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
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


def hf_config(name: str | dict) -> dict:
    """config.json of a shape (a SHAPES name, or such a dict: tests use tiny ones)."""
    shape = dict(SHAPES[name] if isinstance(name, str) else name)
    model_type = shape.pop("model_type", "llama")
    return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID, "torch_dtype": "bfloat16", "attention_bias": False,
            "mlp_bias": False, **shape}


def random_tensors(cfg: dict, seed: int = 0, device: str = "cpu"):
    """Yields (name, tensor) of Llama/Qwen3-layout weights ~ N(0, 0.02), norms 1, bfloat16,
    drawn on `device` one tensor at a time (seeded: the same on the same device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16, device=device)

    yield "model.embed_tokens.weight", rand(v, h)
    yield "model.norm.weight", ones(h)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", rand(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)),
                            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))]:
            yield p + name + ".weight", rand(*shape)
        yield p + "input_layernorm.weight", ones(h)
        yield p + "post_attention_layernorm.weight", ones(h)
        if cfg.get("model_type") == "qwen3":
            yield p + "self_attn.q_norm.weight", ones(hd)
            yield p + "self_attn.k_norm.weight", ones(hd)


def write_random_weights(cfg: dict, file: str, seed: int = 0) -> None:
    """random_tensors(cfg) as one safetensors file."""
    from safetensors.torch import save_file
    save_file(dict(random_tensors(cfg, seed)), file, metadata={"format": "pt"})


def config_dir(name: str | dict, root: str | None = None) -> str:
    """A directory of shape `name` (or a SHAPES-like dict) with config.json and the
    tokenizer only, written once: the model for EngineConfig.load_format "dummy" (random
    weights made on the device) and for RandomCheckpoint."""
    cfg = hf_config(name)
    key = name if isinstance(name, str) else \
        "custom-" + hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(root or cache_root(), key + "-config")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        write_padded_tokenizer(tmp, cfg["vocab_size"])
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


class RandomCheckpoint(HFCheckpoint):
    """A config_dir whose weights (random_tensors) are drawn as the loader reads them: the
    real loading path (quantization at load included) without a weights file. Pass it as
    the engine's model: ``LLM(RandomCheckpoint(config_dir("tinyllama-1.1b")), quantization="int4")``.
    draw_device "cuda" draws there (a CPU takes ~30 s per billion) and hands the loader
    CPU tensors, as a file would."""

    def __init__(self, path: str, seed: int = 0, draw_device: str = "cpu"):
        self.seed, self.draw_device = seed, draw_device
        super().__init__(path, weights=False)

    def tensors(self):
        for name, t in random_tensors(self.hf_config, self.seed, self.draw_device):
            yield name, t.cpu()


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
