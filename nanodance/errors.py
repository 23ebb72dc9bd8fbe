"""The error hierarchy: every error nanodance raises on purpose, all defined here, all deriving
from `NanodanceError`.

Each class also derives from the builtin that fits (`ValueError` for bad input, `RuntimeError`
for a state the engine cannot get out of), so `except ValueError` keeps working for callers
who do not know nanodance. Messages name the problem and, where there is one, the fix. After
any of them the engine stays usable and holds no block for the failed call.

    NanodanceError
    ├── ModelLoadError (ValueError)    the model folder, its weights (weights.py)
    │   ├── ConfigError                config.json missing, malformed or unsupported (config.py)
    │   └── TokenizerError             tokenizer.json or chat template unusable (tokenizer.py)
    ├── RequestError (ValueError)      prompts, sampling params, rounds, engine options
    ├── CapacityError (RuntimeError)   shared blocks whose masters cannot be prefilled
    ├── TensorParallelError (RuntimeError)  the tensor-parallel group failed or was shut down (tp_launch.py)
    │   └── WorkerDiedError            a worker rank's process died; the others were shut down
    └── PrepareError (RuntimeError)    preparing the default model failed (tools/prepare.py)
        └── ModelPackageUnavailable    the GGUF is neither installed nor downloadable

A single request that can never fit is not raised: it finishes with finish_reason "error" and
the message of a `CapacityError` in its output, while the other requests complete.
`NoFreeBlocks` (last) is the block pool's internal signal, caught inside the engine.
"""
from __future__ import annotations


class NanodanceError(Exception):
    """Base class of every error nanodance raises deliberately."""


class ModelLoadError(NanodanceError, ValueError):
    """A model folder is missing, malformed, or holds tensors that do not fit its config."""


class RequestError(NanodanceError, ValueError):
    """A request (prompt, sampling params, round) or an engine option is invalid; nothing was enqueued."""


class CapacityError(NanodanceError, RuntimeError):
    """The KV pool cannot hold what a request or a round's shared blocks need; the message says what to raise."""


class TensorParallelError(NanodanceError, RuntimeError):
    """The tensor-parallel group cannot serve: a collective failed, or the group was shut down.

    The workers are shut down when it is raised; the LLM cannot run the model again (make a new one)."""


class WorkerDiedError(TensorParallelError):
    """A tensor-parallel worker process died; the message names its rank and how it ended."""


class ConfigError(ModelLoadError):
    """config.json is missing, malformed, or describes a model nanodance cannot run."""


class TokenizerError(ModelLoadError):
    """The tokenizer files are missing or malformed, or the request cannot be rendered."""


class PrepareError(NanodanceError, RuntimeError):
    """The default model could not be prepared; the message says how to fix or retry."""


class ModelPackageUnavailable(PrepareError):
    """The GGUF could be found neither in an installed package nor by downloading the wheel."""


class NoFreeBlocks(Exception):
    """Internal signal, never raised to a caller: the pool cannot satisfy an allocation right now
    (the scheduler preempts, a layout gives back what it took)."""
