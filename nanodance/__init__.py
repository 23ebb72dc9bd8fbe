"""nanodance: a compact PyTorch-native LLM engine for multi-agent rounds with collective KV sharing.

    from nanodance import LLM, SamplingParams, Shared
"""
from nanodance.engine import RequestOutput
from nanodance.engine_config import EngineConfig
from nanodance.errors import CapacityError, ModelLoadError, NanodanceError, RequestError
from nanodance.llm import LLM
from nanodance.sampling import SamplingParams
from nanodance.segments import Shared

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "Shared", "NanodanceError", "ModelLoadError",
           "RequestError", "CapacityError"]
