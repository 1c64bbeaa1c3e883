"""One normalised model configuration, whatever the checkpoint format.

Hugging Face ``config.json`` files (old ``rope_theta``/``rope_scaling`` keys and the newer
``rope_parameters`` form) and GGUF metadata are both turned into a :class:`ModelConfig`,
so the model code reads one set of names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class MiaotuiError(Exception):
    """A user-facing error: the CLI prints its message on one line, no traceback."""


@dataclass
class ModelConfig:
    family: str                      # implementation: "llama", "gpt2", "gemma3"
    model_type: str                  # as named by the checkpoint (llama, mistral, qwen2, ...)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # e.g. {"rope_type": "llama3", "factor": 8, ...}
    rope_local_theta: float | None = None  # gemma3: theta of sliding-window layers
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None   # per layer: "full_attention" | "sliding_attention"
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    @property
    def attention_window(self) -> int | None:
        """The sliding layers' window, or None when no layer slides."""
        return self.sliding_window if self.layer_types and "sliding_attention" in self.layer_types else None

    def num_params(self) -> int:
        """Parameter count of the weights (embeddings counted once when tied)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = (2 if self.family == "gpt2" else 3) * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * (attn + mlp) + emb


# model_type (HF) -> implementation family
FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "smollm": "llama", "smollm2": "llama", "smollm3": "llama",
    "gpt2": "gpt2",
    "gemma3_text": "gemma3", "gemma3": "gemma3",
}


def _eos_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _rope_from_hf(d: dict) -> tuple[float, dict | None, float | None]:
    """(theta, scaling, local_theta) from either the old or the new HF rope keys."""
    rp = d.get("rope_parameters")
    theta = float(d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling")
    local = d.get("rope_local_base_freq")
    if isinstance(rp, dict):
        if "full_attention" in rp:  # gemma3 style: one entry per layer kind
            full, slid = rp.get("full_attention", {}), rp.get("sliding_attention", {})
            theta = float(full.get("rope_theta", theta))
            scaling = full if full.get("rope_type", "default") != "default" else None
            if "rope_theta" in slid:
                local = float(slid["rope_theta"])
        else:
            theta = float(rp.get("rope_theta", theta))
            scaling = rp if rp.get("rope_type", "default") != "default" else None
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling, (float(local) if local is not None else None)


def config_from_hf(d: dict) -> ModelConfig:
    """Normalise a Hugging Face config.json dict."""
    if "text_config" in d and d.get("model_type") == "gemma3":
        d = {**d["text_config"], "model_type": "gemma3_text"}
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise MiaotuiError(
            f"unsupported architecture {mt!r} (supported: {', '.join(sorted(FAMILIES))})")
    fam = FAMILIES[mt]
    if fam == "gpt2":
        h = d["n_embd"]
        nh = d["n_head"]
        return ModelConfig(
            family=fam, model_type=mt, vocab_size=d["vocab_size"], hidden_size=h,
            intermediate_size=d.get("n_inner") or 4 * h, num_layers=d["n_layer"],
            num_heads=nh, num_kv_heads=nh, head_dim=h // nh,
            max_position_embeddings=d.get("n_positions", 1024),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            hidden_act=d.get("activation_function", "gelu_new"),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            qkv_bias=True, o_bias=True, mlp_bias=True,
            bos_token_id=d.get("bos_token_id"), eos_token_ids=_eos_list(d.get("eos_token_id")))
    h, nh = d["hidden_size"], d["num_attention_heads"]
    theta, scaling, local = _rope_from_hf(d)
    layer_types = d.get("layer_types")
    sliding = d.get("sliding_window")
    if fam == "llama" and mt in ("mistral", "qwen2", "qwen3") and sliding:
        use = d.get("use_sliding_window", mt == "mistral")
        if not use:
            sliding = None
    if fam == "llama":
        layer_types = None if not sliding else ["sliding_attention"] * d["num_hidden_layers"]
    if fam == "gemma3" and layer_types is None:
        pattern = d.get("sliding_window_pattern", 6)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                       for i in range(d["num_hidden_layers"])]
    return ModelConfig(
        family=fam, model_type=mt, vocab_size=d["vocab_size"], hidden_size=h,
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=nh, num_kv_heads=d.get("num_key_value_heads") or nh,
        head_dim=d.get("head_dim") or h // nh,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        hidden_act=d.get("hidden_activation") or d.get("hidden_act", "silu"),
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local,
        tie_word_embeddings=d.get("tie_word_embeddings", fam == "gemma3"),
        qkv_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
        o_bias=False if mt == "qwen2" else bool(d.get("attention_bias", False)),
        mlp_bias=d.get("mlp_bias", False), qk_norm=mt in ("qwen3",) or fam == "gemma3",
        sliding_window=sliding, layer_types=layer_types,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
        final_logit_softcapping=d.get("final_logit_softcapping"),
        attn_logit_softcapping=d.get("attn_logit_softcapping"),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=_eos_list(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"))
