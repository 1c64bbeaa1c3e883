"""Architecture registry: ModelConfig.family -> implementation."""
from miaotui.config import MiaotuiError, ModelConfig


def get_model_class(cfg: ModelConfig):
    if cfg.family == "llama":
        from miaotui.models.llama import LlamaForCausalLM
        return LlamaForCausalLM
    if cfg.family == "gpt2":
        from miaotui.models.gpt2 import GPT2LMHeadModel
        return GPT2LMHeadModel
    if cfg.family == "gemma3":
        from miaotui.models.gemma3 import Gemma3ForCausalLM
        return Gemma3ForCausalLM
    raise MiaotuiError(f"unsupported architecture {cfg.model_type!r}")
