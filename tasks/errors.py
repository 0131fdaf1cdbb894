"""Which errors a retry cannot fix, in one place: the training driver (tasks/training/train.py) and the flow's
task retries (flows/pipeline.py) both ask is_deterministic(), and the CLI reports the user-input errors by name.

Standard library and torch-free modules only, so the flow's entrypoints can classify errors without torch.
"""

from __future__ import annotations

import re

from tasks.config import ConfigError
from tasks.data.sources import SourceError


class ShardFormatError(ValueError):
    """A shard is unreadable or holds a sample the pipeline refuses to load."""


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged or unsafe to load."""


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class TrainingError(RuntimeError):
    """Training cannot start or did not finish; the message says what to do about it.

    retryable is False when trying again cannot help (bad input, a bug, a NaN loss): the flow must not retry.
    cause is the worker's error that ended the training, when one did.
    """

    def __init__(self, message: str, *, retryable: bool = True, cause: BaseException | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.cause = cause


# The user's input is wrong (a configuration, a source dataset, shards, a checkpoint): the message names it.
INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, SourceError, ShardFormatError, CheckpointError)
# Errors that happen again on every attempt: bad input, a bug, a diverged loss. Retrying only repeats them.
DETERMINISTIC_ERRORS: tuple[type[Exception], ...] = (
    *INPUT_ERRORS, NonFiniteLossError, AssertionError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, NameError, ImportError, NotImplementedError, ZeroDivisionError,
)
# torch reports shape and size mismatches as plain RuntimeErrors; these messages mark them as deterministic.
SHAPE_ERROR = re.compile(r"shape|size mismatch|sizes? of tensors|dimension|must match the size", re.IGNORECASE)


def is_deterministic(error: BaseException) -> bool:
    """Whether `error` would be raised again by a retry (from the last checkpoint, or of a whole task)."""
    if isinstance(error, DETERMINISTIC_ERRORS):
        return True
    return type(error) is RuntimeError and bool(SHAPE_ERROR.search(str(error)))
