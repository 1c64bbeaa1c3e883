"""Test helper: write a (tiny) transformers causal LM as a GGUF file, the way llama.cpp's
converter lays it out, so GGUF loading can be tested without model downloads.

Conventions followed (llama.cpp's): tensor names from ``gguf.get_tensor_name_map``; llama q/k
rows permuted per head; gemma3 RMSNorm weights stored as ``1 + w``; GPT-2 Conv1D weights stored
transposed and the tied ``output.weight`` written out; llama3 rope scaling as a ``rope_freqs``
tensor; vectors always F32; a 2-D tensor whose rows do not fit the block size falls back to F16.
The tokenizer block is a dummy byte-level GPT-2 BPE (256 byte tokens, ``<|endoftext|>``, then
merged pairs) sized to the model's vocabulary, which must be larger than 256.
"""
from __future__ import annotations

import math
import os

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
         "gpt2": "gpt2", "gemma3_text": "gemma3"}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes, indexed by byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def add_dummy_tokenizer(w: gguf.GGUFWriter, vocab_size: int) -> int:
    """A valid byte-level BPE vocabulary of exactly vocab_size tokens; returns the eos id."""
    if vocab_size <= 256:
        raise ValueError("the dummy tokenizer needs a vocabulary larger than 256")
    symbols = _byte_symbols()
    tokens = symbols + ["<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL]
    merges: list[str] = []
    letters = [s for s in symbols if s.isalpha() and s.isascii()]
    pairs = ((a, b) for a in letters + symbols for b in letters + symbols)
    seen = set(tokens)
    while len(tokens) < vocab_size:
        a, b = next(pairs)
        if a + b in seen:
            continue
        seen.add(a + b)
        tokens.append(a + b)
        types.append(gguf.TokenType.NORMAL)
        merges.append(f"{a} {b}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the name llama.cpp knows
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges or ["a b"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    w.add_add_bos_token(False)
    return 256


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved row by row."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(rp: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling (what llama.cpp stores as rope_freqs)."""
    theta, factor = rp["rope_theta"], rp["factor"]
    low, high, old = rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def encode(a: np.ndarray, qtype: str) -> tuple[np.ndarray, QT | None]:
    """(data, raw_dtype for GGUFWriter.add_tensor) for one tensor."""
    if a.ndim < 2 or qtype == "F32":
        return a.astype(np.float32), None
    if qtype == "F16":
        return a.astype(np.float16), None
    qt = QT[qtype]
    if a.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a.astype(np.float32), qt), qt


def _rope(cfg) -> tuple[float, dict, float | None]:
    """(theta, scaling dict or {}, local theta) from a transformers 5 config."""
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    if "full_attention" in rp:
        local = rp.get("sliding_attention", {}).get("rope_theta")
        rp = dict(rp["full_attention"])
        return float(rp["rope_theta"]), rp, local
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))), rp, None


def write_gguf_from_hf(model, out_path: str, qtype: str = "F32") -> str:
    """Convert a transformers model (or a model directory) to a GGUF file at out_path."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if qtype not in FILE_TYPES:
        raise ValueError(f"qtype must be one of {sorted(FILE_TYPES)}")
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    w = gguf.GGUFWriter(os.fspath(out_path), arch)
    w.add_name(f"tiny-{cfg.model_type}")
    w.add_file_type(FILE_TYPES[qtype])
    if qtype not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra: dict[str, np.ndarray] = {}

    if arch == "gpt2":
        n_layers, n_heads = cfg.n_layer, cfg.n_head
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_block_count(n_layers)
        w.add_head_count(n_heads)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        n_layers, n_heads, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        theta, rp, local = _rope(cfg)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(n_layers)
        w.add_head_count(n_heads)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        kind = rp.get("rope_type", "default")
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rp["factor"])
        elif kind == "llama3":
            extra["rope_freqs.weight"] = llama3_rope_freqs({**rp, "rope_theta": theta}, head_dim)
        elif kind != "default":
            raise ValueError(f"rope type {kind!r} is not handled by this test writer")
        if arch == "llama":
            w.add_vocab_size(cfg.vocab_size)
            w.add_rope_dimension_count(head_dim)
        if arch == "gemma3":
            layer_types = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                           for i in range(n_layers)]
            if (list(cfg.layer_types) != layer_types or (local or 10000.0) != 10000.0
                    or cfg.query_pre_attn_scalar != head_dim):
                raise ValueError("llama.cpp's gemma3 layout assumes a sliding pattern of 6, local rope "
                                 "theta 10000 and query_pre_attn_scalar == head_dim")
            w.add_sliding_window(cfg.sliding_window)
    add_dummy_tokenizer(w, cfg.vocab_size)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    state = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and (tied or arch == "gpt2"):
            continue  # gpt2: written from wte below, as llama.cpp does
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        a = t.detach().float().cpu().numpy()
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        name = f"{name}.{suffix}"
        if arch == "llama" and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            a = permute_qk(a, n_heads if base.endswith("q_proj") else n_kv)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            a = a + 1.0
        if arch == "gpt2" and hf_name.endswith(GPT2_CONV1D):
            a = a.T
        extra[name] = a
        if arch == "gpt2" and name == "token_embd.weight":
            extra["output.weight"] = a
    for name, a in extra.items():
        data, raw = encode(np.ascontiguousarray(a), "F32" if name == "rope_freqs.weight" else qtype)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(out_path)
