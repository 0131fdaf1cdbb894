"""`vit-pipeline evaluate --model NAME`: the models named only, merged into evaluation.json beside the others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from flows.cli import main
from tasks.judging.evaluate import Evaluation, write_evaluation
from tasks.layout import RunLayout
from tests.support.evaluation import evaluation_record
from tests.support.inference import TINY_VIT, trained_run

VIT = TINY_VIT["name"]
BASELINE = "resnet10t"


def test_evaluate_named_models_of_a_run_where_only_one_was_trained(tmp_path, mini_shards, capsys):
    config = trained_run(tmp_path, mini_shards)
    layout = RunLayout.of(config)
    shutil.rmtree(layout.model_dir(BASELINE))  # only the ViT was trained (`vit-pipeline train --model ...`)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    cli = ["evaluate", "--config", str(config_file)]

    assert main(cli) == 2  # every model of the config, as before: the baseline was not trained
    assert f"{BASELINE}: trained weights not found" in capsys.readouterr().err
    for unknown, message in ((BASELINE, f"{BASELINE}: trained weights not found"),
                             ("vit_small", "model.vit_small: not in this configuration")):
        assert main([*cli, "--model", VIT, "--model", unknown]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not layout.evaluation.exists()  # nothing evaluated before every name was checked

    # A record of another model scored earlier is kept; the named model's record is (re)written.
    earlier = evaluation_record(BASELINE, 0.5, role="baseline")
    stale = evaluation_record(VIT, 0.0, test_samples=1)
    classes = json.loads((Path(mini_shards) / "manifest.json").read_text())["classes"]
    write_evaluation(layout.evaluation, Evaluation([stale, earlier], classes))
    assert main([*cli, "--model", VIT, "--model", VIT]) == 0
    written = json.loads(layout.evaluation.read_text())
    assert [record["model"] for record in written["models"]] == [BASELINE, VIT]  # the configuration's order
    assert written["models"][0] == earlier.to_json()
    assert 0 <= written["models"][1]["top1"] <= 1 and written["models"][1]["test_samples"] == 200
    assert written["classes"] == classes
    table = capsys.readouterr().out
    assert f"| {BASELINE} |" in table and f"| {VIT} |" in table
