"""evaluation.json as EvaluationRecords: read back as written, its keys on disk unchanged, a bad field named with
its file."""

from __future__ import annotations

import json

import pytest

from tasks.judging.evaluate import Evaluation, read_evaluation, write_evaluation
from tasks.layout import RunLayout
from tests.support.evaluation import RECORD_KEYS, evaluation_record, tiny_config

UNVALIDATED_RECORD_KEYS = [key for key in RECORD_KEYS if key not in ("val_top1", "val_samples")]
CLASSES = [str(c) for c in range(10)]


@pytest.fixture
def config(tmp_path):
    return tiny_config(tmp_path, str(tmp_path / "shards"))


def _evaluation() -> Evaluation:
    return Evaluation([
        evaluation_record("resnet10t", 0.81, role="baseline"),
        # no validation split, never trained: the fields evaluate leaves out or writes as null
        evaluation_record("vit_tiny_patch4_32", 0.75, val_top1=None, val_samples=None, train_seconds=None,
                          train_images_per_s=None, device_hours=None, device_kind=None, epochs=None,
                          best_epoch=None, train_val_top1=None, per_class_accuracy=[None] * 10),
    ], CLASSES)


def test_an_evaluation_reads_back_as_written(config):
    written = _evaluation()
    write_evaluation(RunLayout.of(config).evaluation, written)
    assert read_evaluation(config) == written


def test_the_evaluation_on_disk_keeps_its_keys(config):
    write_evaluation(RunLayout.of(config).evaluation, _evaluation())
    stored = json.loads(RunLayout.of(config).evaluation.read_text())
    assert list(stored) == ["models", "classes"] and stored["classes"] == CLASSES
    validated, unvalidated = stored["models"]
    assert list(validated) == RECORD_KEYS
    assert list(unvalidated) == UNVALIDATED_RECORD_KEYS  # left out, not null, as evaluate always wrote them
    assert unvalidated["train_seconds"] is None and unvalidated["per_class_accuracy"] == [None] * 10


@pytest.mark.parametrize(("model", "key", "value", "named"), [
    (0, "top1", "0.81", "field 'models.0.top1': input should be a valid number"),
    (1, "params", None, "field 'models.1.params' missing"),
    (1, "confusion_matrix", [[1.5]], "field 'models.1.confusion_matrix.0.0'"),
    (0, "epochs", "3", "field 'models.0.epochs'"),
])
def test_a_missing_or_wrongly_typed_field_is_named_with_its_file(config, model, key, value, named):
    path = RunLayout.of(config).evaluation
    write_evaluation(path, _evaluation())
    stored = json.loads(path.read_text())
    if value is None:
        del stored["models"][model][key]
    else:
        stored["models"][model][key] = value
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError) as raised:
        read_evaluation(config)
    assert str(raised.value).startswith(f"{path}: ") and named in str(raised.value)
