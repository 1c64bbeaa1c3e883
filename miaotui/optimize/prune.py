"""Pruning: zero weights (unstructured, N:M) or remove whole layers, MLP channels and
attention heads (structured), calibrated on text, and save an ordinary HF checkpoint.

Unstructured and N:M (``pattern=(n, m)``: n weights kept in every m consecutive inputs of a
row) masks, for every linear layer of the decoder blocks (not the embeddings or the head):

* magnitude: the smallest |W| of each layer (its merged q/k/v or gate/up matrix) go.
* Wanda (Sun et al. 2023): score |W[i, j]| * ||x_j||_2 over the calibration tokens,
  compared within each output row (or each group of m).
* SparseGPT (Frantar & Alistarh 2023): the OBS update of GPTQ (optimize/gptq.py) with
  "zero this weight" in place of "round it": columns are fixed left to right, each pruned
  weight's error spread over the columns not fixed yet, weighted by H = sum x x^T; the mask
  is chosen per block of 128 columns (per group of m for N:M) by w^2 / [H^-1]_jj^2 on the
  weights updated so far.

The Hessians of all layers come from one pass of the dense model over the calibration text
(``gptq.collect_hessians``), not layer by layer on the pruned model's outputs as in the
papers: simpler, and the same statistics serve GPTQ.

Structured pruning shrinks shapes, so every path gets faster with no sparse kernel:

* layers: the blocks that change the hidden state least, importance 1 - cos(h_in, h_out)
  averaged over the calibration tokens, are dropped.
* width: MLP channels by ||a_c||_2 * ||W_down[:, c]||_2 (a_c: the channel's activation on
  calibration text; the channel's gate and up rows and its down column go together), the
  same number in every layer (config.json has one intermediate_size), rounded to 32; and
  optionally whole KV groups (a K/V head and the query heads that read it) by the energy
  sum ||a_c||^2 ||W_o[:, c]||^2 of their o_proj input columns.

The output is a Hugging Face directory (config.json updated, safetensors, tokenizer) that
transformers and miaotui load; after N:M pruning config.json says so under ``"pruning"``,
and miaotui then stores 2:4 weights compressed (layers/sparse.py).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from miaotui.config import MiaotuiError
from miaotui.layers.linear import Linear

METHODS = ("magnitude", "wanda", "sparsegpt", "layers", "width")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def _say(msg: str) -> None:
    print(f"[miaotui] {msg}", file=sys.stderr, flush=True)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4): n weights kept in every m."""
    if not pattern:
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise MiaotuiError(f"--pattern {pattern!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m or m > 64:
        raise MiaotuiError(f"--pattern {pattern!r}: need 0 < N < M <= 64")
    return n, m


# ---- masks ---------------------------------------------------------------------------------

def mask_from_scores(score: torch.Tensor, sparsity: float = 0.0, pattern: tuple[int, int] | None = None,
                     per_row: bool = True) -> torch.Tensor:
    """Boolean keep-mask [out, in]: the highest scores survive. pattern (n, m): n kept in
    every m consecutive inputs of a row; else round(sparsity * size) pruned in each row
    (per_row) or in the whole matrix."""
    rows, k = score.shape
    keep = torch.zeros(rows, k, dtype=torch.bool)
    if pattern is not None:
        n, m = pattern
        if k % m:
            raise ValueError(f"in_features {k} is not a multiple of {m} ({n}:{m} pattern)")
        top = score.reshape(rows, k // m, m).topk(n, dim=-1).indices
        keep.view(rows, k // m, m).scatter_(-1, top, True)
        return keep
    if per_row:
        drop = round(sparsity * k)
        if drop:
            low = score.topk(drop, dim=1, largest=False).indices
            keep.fill_(True).scatter_(1, low, False)
        else:
            keep.fill_(True)
        return keep
    drop = round(sparsity * score.numel())
    keep.fill_(True)
    if drop:
        keep.view(-1)[score.reshape(-1).topk(drop, largest=False).indices] = False
    return keep


def magnitude_prune(w: torch.Tensor, sparsity: float = 0.0, pattern=None) -> torch.Tensor:
    """w with its smallest |w| zeroed: in the whole matrix, or per group of m (N:M)."""
    return w * mask_from_scores(w.abs(), sparsity, pattern, per_row=False)


def wanda_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.0, pattern=None) -> torch.Tensor:
    """Wanda: |W| * ||x_j||_2 (the square root of H's diagonal), compared within each row."""
    norms = torch.diag(h).clamp(min=0).sqrt().to(w.dtype)
    return w * mask_from_scores(w.abs() * norms[None, :], sparsity, pattern, per_row=True)


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.0, pattern=None,
                    block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT: prune while compensating the error on the inputs' span (module docstring).
    Returns float32 w with exactly the requested zeros (per block of columns, or N:M)."""
    from miaotui.optimize.gptq import damped, inverse_cholesky
    out_dtype = w.dtype
    n_rows, k = w.shape
    if pattern is not None and (k % pattern[1] or block % pattern[1]):
        raise ValueError(f"in_features {k} is not a multiple of {pattern[1]}")
    w, h = damped(w, h, damp)
    hinv = inverse_cholesky(h)
    d = torch.diag(hinv)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w1 = w[:, b0:b1].clone()
        keep = torch.ones_like(w1, dtype=torch.bool)
        if pattern is None:
            keep = mask_from_scores(w1 ** 2 / d[None, b0:b1] ** 2, sparsity, per_row=False)
        errs = torch.zeros_like(w1)
        for j in range(b1 - b0):
            if pattern is not None and j % pattern[1] == 0:
                g = slice(j, j + pattern[1])
                keep[:, g] = mask_from_scores(w1[:, g] ** 2 / d[None, b0 + j:b0 + j + pattern[1]] ** 2,
                                              pattern=pattern)
            col = w1[:, j]
            q = torch.where(keep[:, j], col, 0.0)
            err = (col - q) / hinv[b0 + j, b0 + j]
            w1[:, j + 1:] -= err[:, None] * hinv[b0 + j, b0 + j + 1:b1][None, :]
            w1[:, j] = q
            errs[:, j] = err
        w[:, b0:b1] = w1
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    return w.to(out_dtype)


# ---- calibration -----------------------------------------------------------------------------

def _run_prompts(engine, ids: list[int], window: int) -> None:
    from miaotui.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    for i, b in enumerate(range(0, len(ids) - 1, window)):
        engine.add_request(f"calib-{i}", ids[b:b + window], params)
    while engine.has_unfinished():
        engine.step()


@torch.inference_mode()
def layer_importance(engine, ids: list[int], window: int = 512) -> list[float]:
    """1 - mean cosine(h_in, h_out) of each decoder block over the calibration prompts."""
    layers = engine.model.layers
    sums = [0.0] * len(layers)
    count = [0]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(mod, args, out, i=i):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            if i == 0:
                count[0] += cos.numel()
        hooks.append(layer.register_forward_hook(hook))
    try:
        _run_prompts(engine, ids, window)
    finally:
        for h in hooks:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


# ---- saving as a Hugging Face checkpoint -------------------------------------------------------

def hf_state(model) -> dict[str, torch.Tensor]:
    """The model's float weights under transformers' names (Llama family and Gemma 3)."""
    from miaotui.layers.norm import RMSNorm
    cfg = model.cfg
    sd = {"model.embed_tokens.weight": model.embed_tokens.dense()}

    def linear(prefix: str, lin: Linear, names: list[str]) -> None:
        if lin.weight is None:
            raise MiaotuiError("pruning needs float weights (the model was loaded quantized)")
        for name, w in zip(names, lin.weight.data.split(lin.output_sizes)):
            sd[f"{prefix}{name}.weight"] = w
        if lin.bias is not None:
            for name, b in zip(names, lin.bias.data.split(lin.output_sizes)):
                sd[f"{prefix}{name}.bias"] = b

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a, mlp = layer.self_attn, layer.mlp
        linear(p + "self_attn.", a.qkv_proj, ["q_proj", "k_proj", "v_proj"])
        linear(p + "self_attn.", a.o_proj, ["o_proj"])
        linear(p + "mlp.", mlp.gate_up_proj, ["gate_proj", "up_proj"])
        linear(p + "mlp.", mlp.down_proj, ["down_proj"])
        for name, mod in layer.named_modules():
            if isinstance(mod, RMSNorm):
                sd[f"{p}{name}.weight"] = mod.weight.data - mod.weight_offset
    sd["model.norm.weight"] = model.norm.weight.data - model.norm.weight_offset
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight.data
    return {k: v.contiguous() for k, v in sd.items()}


def _int_if_whole(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def hf_config_of(cfg) -> dict:
    """A transformers config.json for a model read from GGUF (Llama family, Gemma 3)."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                  pad_token_id=cfg.pad_token_id,
                  eos_token_id=cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids)
    if cfg.rope_scaling:
        common["rope_scaling"] = cfg.rope_scaling
    if cfg.family == "gemma3":
        return dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], **common,
                    hidden_activation=cfg.hidden_act, sliding_window=cfg.sliding_window,
                    layer_types=list(cfg.layer_types), rope_local_base_freq=cfg.rope_local_theta,
                    query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
                    final_logit_softcapping=cfg.final_logit_softcapping,
                    attn_logit_softcapping=cfg.attn_logit_softcapping)
    if cfg.family != "llama" or cfg.qk_norm or cfg.qkv_bias != cfg.o_bias or cfg.layer_types:
        raise MiaotuiError(f"pruning a GGUF {cfg.model_type} model is not supported "
                           "(Llama and Gemma 3 are; or start from a Hugging Face directory)")
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], **common,
                hidden_act=cfg.hidden_act, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def _write_tokenizer(ckpt, out: str) -> None:
    if not hasattr(ckpt, "metadata"):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(ckpt.path, name)):
                shutil.copy(os.path.join(ckpt.path, name), os.path.join(out, name))
        return
    from miaotui.loader import load_tokenizer
    tok = load_tokenizer(ckpt)
    tok.backend.save(os.path.join(out, "tokenizer.json"))
    conf = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos,
            "add_eos_token": tok.add_eos, "tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.chat_template:
        conf["chat_template"] = tok.chat_template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ckpt.config.bos_token_id,
                   "eos_token_id": sorted(tok.eos_token_ids)}, f, indent=2)


# ---- structured pruning on the saved state --------------------------------------------------

def drop_layers(sd: dict, config: dict, drop: set[int]) -> None:
    """Remove decoder blocks `drop` (renumbering the rest) from an HF state dict + config."""
    n = config["num_hidden_layers"]
    keep = [i for i in range(n) if i not in drop]
    new = {}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            if int(i) in drop:
                continue
            name = f"model.layers.{keep.index(int(i))}.{rest}"
        new[name] = t
    sd.clear()
    sd.update(new)
    config["num_hidden_layers"] = len(keep)
    if config.get("layer_types"):
        config["layer_types"] = [config["layer_types"][i] for i in keep]


def shrink_mlp(sd: dict, config: dict, keep: list[torch.Tensor]) -> None:
    """Keep MLP channels keep[i] (same count in every layer) of each layer i."""
    for i, idx in enumerate(keep):
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            sd[p + name + ".weight"] = sd[p + name + ".weight"][idx].contiguous()
            if p + name + ".bias" in sd:
                sd[p + name + ".bias"] = sd[p + name + ".bias"][idx].contiguous()
        sd[p + "down_proj.weight"] = sd[p + "down_proj.weight"][:, idx].contiguous()
    config["intermediate_size"] = len(keep[0])


def shrink_heads(sd: dict, config: dict, keep_groups: list[list[int]], cfg) -> None:
    """Keep KV groups keep_groups[i] (same count per layer): their K/V heads, the query
    heads that read them, and the matching o_proj columns."""
    hd, rep = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    for i, groups in enumerate(keep_groups):
        p = f"model.layers.{i}.self_attn."
        kv = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        q = torch.cat([torch.arange(h * hd, (h + 1) * hd) for g in groups for h in range(g * rep, (g + 1) * rep)])
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            for kind in ("weight", "bias"):
                if f"{p}{name}.{kind}" in sd:
                    sd[f"{p}{name}.{kind}"] = sd[f"{p}{name}.{kind}"][rows].contiguous()
        sd[p + "o_proj.weight"] = sd[p + "o_proj.weight"][:, q].contiguous()
    n = len(keep_groups[0])
    config["num_key_value_heads"] = n
    config["num_attention_heads"] = n * rep
    config["head_dim"] = hd


# ---- the whole transformation ---------------------------------------------------------------

def _calib_ids(engine, calib: str | None, tokens: int) -> list[int]:
    if not calib or not os.path.isfile(calib):
        raise MiaotuiError("this method needs --calib FILE, a text file to calibrate on")
    with open(calib, encoding="utf-8") as f:
        ids = engine.tokenizer.encode(f.read())[:tokens]
    if len(ids) < 64:
        raise MiaotuiError(f"{calib}: {len(ids)} tokens; pruning needs at least 64 to calibrate on")
    return ids


def prune_model(engine, method: str, sparsity: float, pattern=None, calib_ids=None,
                window: int = 512, kv_groups: int = 0, progress: bool = True) -> dict:
    """Prune engine.model (float weights) in place (unstructured / N:M), or return the plan
    of a structured method: {"drop": layers} or {"mlp_keep": [...], "kv_keep": [...]}."""
    from tqdm import tqdm
    from miaotui.optimize.gptq import collect_hessians
    model = engine.model
    if method == "layers":
        imp = layer_importance(engine, calib_ids, window)
        n = round(sparsity * len(imp))
        drop = sorted(sorted(range(len(imp)), key=lambda i: imp[i])[:n])
        _say(f"layer importance (1 - cos): {', '.join(f'{v:.3f}' for v in imp)}; dropping {drop}")
        return {"drop": drop, "importance": imp}
    if method in ("wanda", "sparsegpt", "width"):
        _say(f"calibrating on {len(calib_ids)} tokens")
        hs = collect_hessians(engine, calib_ids, window)
    if method == "width":
        cfg = model.cfg
        n_keep = max(32, int(round(cfg.intermediate_size * (1 - sparsity) / 32)) * 32)
        n_keep = min(n_keep, cfg.intermediate_size)
        mlp_keep, kv_keep = [], []
        for layer in model.layers:
            down = layer.mlp.down_proj
            score = torch.diag(hs[down]).float().clamp(min=0).sqrt() * down.weight.data.norm(dim=0)
            mlp_keep.append(score.topk(n_keep).indices.sort().values)
            o = layer.self_attn.o_proj
            e = torch.diag(hs[o]).float().clamp(min=0) * o.weight.data.pow(2).sum(0)
            per_group = e.view(cfg.num_kv_heads, -1).sum(1)
            kv_keep.append(per_group.topk(cfg.num_kv_heads - kv_groups).indices.sort().values.tolist())
        return {"mlp_keep": mlp_keep, "kv_keep": kv_keep}
    lins = [m for name, m in model.named_modules()
            if isinstance(m, Linear) and m is not model.lm_head]
    for lin in tqdm(lins, desc=f"pruning ({method})", disable=not progress, leave=False, file=sys.stderr):
        w = lin.weight.data.float()
        if method == "magnitude":
            new = magnitude_prune(w, sparsity, pattern)
        elif method == "wanda":
            new = wanda_prune(w, hs[lin], sparsity, pattern)
        else:
            new = sparsegpt_prune(w, hs[lin], sparsity, pattern)
        lin.weight.data.copy_(new)
    return {}


def prune_model_dir(src: str, out: str, method: str, sparsity: float = 0.5, pattern: str | None = None,
                    calib: str | None = None, kv_groups: int = 0, calib_tokens: int = 4096,
                    progress: bool = True) -> dict:
    """`miaotui prune`: load src (dequantizing GGUF), prune, save an HF directory to out."""
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    from miaotui.loader import open_checkpoint
    if method not in METHODS:
        raise MiaotuiError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
    nm = parse_pattern(pattern)
    if nm and method not in ("magnitude", "wanda", "sparsegpt"):
        raise MiaotuiError("--pattern goes with magnitude, wanda or sparsegpt")
    if not nm and not 0 < sparsity < 1 and not (method == "width" and kv_groups and sparsity == 0):
        raise MiaotuiError(f"--sparsity {sparsity}: must be between 0 and 1 (exclusive)")
    ckpt = open_checkpoint(src)
    if ckpt.config.family == "gpt2":
        raise MiaotuiError("pruning supports the Llama family and Gemma 3, not GPT-2")
    if hasattr(ckpt, "metadata"):
        _say(f"{os.path.basename(src)} is GGUF: dequantizing it to float32 before pruning "
             "(the output is a float checkpoint; quantize it again with -q int8 / int4)")
        config = hf_config_of(ckpt.config)
    else:
        config = dict(ckpt.hf_config)
        if config.get("quantization_config"):
            raise MiaotuiError(f"{src} is quantized by miaotui; prune the float model, then quantize")
    if kv_groups and not 0 < kv_groups < ckpt.config.num_kv_heads:
        raise MiaotuiError(f"--kv-groups {kv_groups}: the model has {ckpt.config.num_kv_heads} KV "
                           "groups per layer; remove at least 1 and keep at least 1")
    if method != "magnitude" and (not calib or not os.path.isfile(calib)):
        raise MiaotuiError(f"--method {method} needs --calib FILE, a text file to calibrate on")
    engine = LLMEngine(EngineConfig(model=src, quantization="none", enable_prefix_caching=False,
                                    kv_cache_memory=256 << 20, max_num_seqs=8))
    ids = None
    if method != "magnitude":
        ids = _calib_ids(engine, calib, calib_tokens)
    _say(f"pruning {src} ({method}, " + (f"{nm[0]}:{nm[1]}" if nm else f"sparsity {sparsity}") + ")")
    plan = prune_model(engine, method, sparsity, nm, ids, kv_groups=kv_groups, progress=progress)
    sd = hf_state(engine.model)
    if "drop" in plan:
        drop_layers(sd, config, set(plan["drop"]))
    if "mlp_keep" in plan:
        if sparsity > 0:
            shrink_mlp(sd, config, plan["mlp_keep"])
        if kv_groups:
            shrink_heads(sd, config, plan["kv_keep"], engine.model.cfg)
    info = {"method": method, "sparsity": sparsity, **({"pattern": f"{nm[0]}:{nm[1]}"} if nm else {})}
    if "drop" in plan:
        info["dropped_layers"] = plan["drop"]
    if kv_groups:
        info["kv_groups_removed"] = kv_groups
    config["pruning"] = info
    os.makedirs(out, exist_ok=True)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _write_tokenizer(ckpt, out)
    params = sum(t.numel() for t in sd.values())
    zeros = sum(int((t == 0).sum()) for n, t in sd.items() if n.endswith("proj.weight"))
    return {"out": out, **info, "params": params, "zero_weights": zeros,
            "bytes": sum(t.numel() * t.element_size() for t in sd.values())}
