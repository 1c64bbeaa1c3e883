"""miaotui (秒推): LLM inference in seconds."""
from miaotui.config import MiaotuiError
from miaotui.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "MiaotuiError", "LLMEngine", "EngineConfig"]


def __getattr__(name):  # keep `import miaotui` light: torch loads on first use
    if name == "LLM":
        from miaotui.llm import LLM
        return LLM
    if name in ("LLMEngine", "EngineConfig"):
        from miaotui.engine import llm_engine
        return getattr(llm_engine, name)
    raise AttributeError(name)
