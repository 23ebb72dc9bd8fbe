"""The error hierarchy: every error nanodance raises on purpose derives from `NanodanceError`.

Each class also derives from the builtin that fits (`ValueError` for bad input, `RuntimeError`
for a state the engine cannot get out of), so `except ValueError` keeps working for callers
who do not know nanodance. Messages name the problem and, where there is one, the fix.
"""
from __future__ import annotations


class NanodanceError(Exception):
    """Base class of every error nanodance raises deliberately."""


class ModelLoadError(NanodanceError, ValueError):
    """A model folder is missing, malformed, or holds tensors that do not fit its config."""


class RequestError(NanodanceError, ValueError):
    """A request (prompt, sampling params, round) is invalid; nothing was enqueued."""


class CapacityError(NanodanceError, RuntimeError):
    """A request can never fit: longer than max_model_len or than the whole KV pool."""
