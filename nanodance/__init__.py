"""nanodance: a compact PyTorch-native LLM engine for multi-agent rounds with collective KV sharing.

    from nanodance import LLM, SamplingParams
"""
from nanodance.engine import LLM, RequestOutput
from nanodance.errors import CapacityError, ModelLoadError, NanodanceError, RequestError
from nanodance.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "NanodanceError", "ModelLoadError", "RequestError",
           "CapacityError"]
