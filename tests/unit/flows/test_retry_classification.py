"""The trainer (a retry from the last checkpoint) and the flow (a retry of the whole task) agree on which
errors a retry cannot fix: both follow tasks.errors."""

import pytest
from ray.train import TrainingFailedError

from flows.pipeline import _retry_transient
from tasks.errors import DETERMINISTIC_ERRORS
from tasks.training.train import TrainingError, fit_with_retries

TRANSIENT_ERRORS = (OSError, ConnectionError, TimeoutError, RuntimeError)


class _FailingTrainer:
    def __init__(self, error: BaseException):
        self.error = error
        self.attempts = 0

    def fit(self):
        self.attempts += 1
        failure = TrainingFailedError("a worker failed")
        failure.worker_failures = {0: self.error}
        raise failure


class _FailedState:
    def __init__(self, error: BaseException):
        self.error = error

    def result(self, raise_on_failure: bool):
        return self.error


def _trainer_retries(error: BaseException) -> bool:
    trainer = _FailingTrainer(error)
    with pytest.raises(TrainingError):
        fit_with_retries(trainer, "vit", "runs/test/vit", max_failures=1)
    return trainer.attempts > 1


def _flow_retries(error: BaseException) -> bool:
    return _retry_transient(None, None, _FailedState(error))


@pytest.mark.parametrize("error_class", DETERMINISTIC_ERRORS + TRANSIENT_ERRORS, ids=lambda cls: cls.__name__)
def test_trainer_and_flow_classify_every_error_alike(error_class):
    error = error_class("boom")
    retried = error_class in TRANSIENT_ERRORS
    assert _trainer_retries(error) is retried
    assert _flow_retries(error) is retried

