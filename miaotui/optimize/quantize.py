"""`miaotui quantize`: quantize a model's linear weights once and save the result.

The output is a model directory like any other: config.json (with a
``quantization_config`` that names miaotui's format), the tokenizer, and one
model.safetensors holding miaotui's own module state: quantized linears as
``<module>.qweight.{q,scale,min,meta}``, everything else (embeddings, norms) as is.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from miaotui.config import MiaotuiError
from miaotui.layers.linear import Linear

FORMAT = "miaotui"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.qweight is not None:
            for k, t in mod.qweight.state_dict().items():
                state[f"{name}.qweight.{k}"] = t
            if mod.bias is not None:
                state[f"{name}.bias"] = mod.bias.data
    tied = set()
    for name, p in model.named_parameters():
        mod_name = name.rsplit(".", 1)[0]
        mod = model.get_submodule(mod_name) if "." in name else model
        if isinstance(mod, Linear) and mod.qweight is not None:
            continue
        if any(p.data_ptr() == t for t in tied):
            continue  # tied lm_head: saved once as the embedding
        tied.add(p.data_ptr())
        state[name] = p.data.contiguous()
    return state


def load_quantized_state(model: torch.nn.Module, tensors) -> None:
    """Inverse of quantized_state: assign by module path."""
    from miaotui.layers.quant import QuantWeight
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        if ".qweight." in name:
            mod, key = name.split(".qweight.")
            grouped.setdefault(mod, {})[key] = t
        else:   # "embed_tokens": a model parameter before the Embedding module (old files)
            model.get_parameter("embed_tokens.weight" if name == "embed_tokens" else name).data = t
    for mod, sd in grouped.items():
        layer = model.get_submodule(mod)
        layer.qweight = QuantWeight.from_state_dict(sd)
        layer.weight = None


def quantize_model_dir(src: str, out: str, method: str, group_size: int = 32,
                       progress: bool = True, calib: str | None = None) -> dict:
    from miaotui.loader import build_model, open_checkpoint
    ckpt = open_checkpoint(src)
    if not hasattr(ckpt, "hf_config"):
        raise MiaotuiError("quantize takes a Hugging Face model directory; GGUF files are "
                           "already quantized and run as they are")
    if method == "gptq":
        model = _gptq_model(src, group_size, calib, progress)
    else:
        model = build_model(ckpt, quantization=method, group_size=group_size, progress=progress)
    os.makedirs(out, exist_ok=True)
    state = quantized_state(model)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(ckpt.hf_config)
    cfg["quantization_config"] = {"quant_method": FORMAT, "method": method,
                                  "group_size": group_size}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    size = sum(t.numel() * t.element_size() for t in state.values())
    return {"out": out, "method": method, "bytes": size}


def _gptq_model(src: str, group_size: int, calib: str | None, progress: bool):
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    from miaotui.optimize.gptq import quantize_gptq
    if not calib or not os.path.isfile(calib):
        raise MiaotuiError("--method gptq needs --calib FILE, a text file to calibrate on")
    with open(calib, encoding="utf-8") as f:
        text = f.read()
    engine = LLMEngine(EngineConfig(model=src, quantization="none", enable_prefix_caching=False,
                                    kv_cache_memory=256 << 20))
    ids = engine.tokenizer.encode(text)[:4096]
    if len(ids) < 64:
        raise MiaotuiError(f"{calib}: {len(ids)} tokens; GPTQ needs at least 64 to calibrate on")
    quantize_gptq(engine, ids, group_size=group_size, progress=progress)
    return engine.model
