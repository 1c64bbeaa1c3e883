"""miaotui (秒推): LLM inference in seconds."""
import os

# Idle OpenMP threads sleep instead of spinning. With spinning (libgomp's default), a step
# on a 2-core machine where any other process runs took 740 ms instead of 70 ms: each of
# the ~600 small ops per step waited for a descheduled spinning thread. Must be set
# before torch starts its thread pool, so import miaotui before torch to get it.
# (bench/llama_cpp.py undoes it for llama.cpp, whose own OpenMP threads it slows 10x.)
SET_OMP_WAIT_POLICY = "OMP_WAIT_POLICY" not in os.environ and not os.environ.get("MIAOTUI_NO_OMP_POLICY")
if SET_OMP_WAIT_POLICY:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
from miaotui.config import MiaotuiError
from miaotui.sampling_params import SamplingParams, StructuredOutputParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputParams", "MiaotuiError", "LLMEngine", "EngineConfig"]


def __getattr__(name):  # keep `import miaotui` light: torch loads on first use
    if name == "LLM":
        from miaotui.llm import LLM
        return LLM
    if name in ("LLMEngine", "EngineConfig"):
        from miaotui.engine import llm_engine
        return getattr(llm_engine, name)
    raise AttributeError(name)
