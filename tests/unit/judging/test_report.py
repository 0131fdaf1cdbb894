"""Report step: the Pareto front, the DeiT/ViT pairing, and the files written for an evaluated run."""

import json
import re

import pytest
from PIL import Image

from flows.cli import EXIT_BAD_INPUT, main
from tasks.judging.attention import attention_maps
from tasks.judging.evaluate import evaluate_models
from tasks.judging.report import distillation_gains, distillation_partner, pareto_front, write_report
from tests.support.evaluation import evaluation_record, save_random_weights, tiny_config


def test_pareto_front_lower_and_higher_cost():
    costs = [1.0, 2.0, 3.0, 4.0]
    accuracies = [0.5, 0.4, 0.7, 0.6]
    assert pareto_front(costs, accuracies, lower_cost_is_better=True) == [0, 2]  # 2 and 4 are dominated
    # as throughput (higher is better): 4 is the fastest, 3 slower but the most accurate
    assert pareto_front(costs, accuracies, lower_cost_is_better=False) == [2, 3]


def test_deit_pairs_with_the_vit_of_its_size():
    assert distillation_partner("deit_tiny_distilled_patch4_32") == "vit_tiny_patch4_32"
    assert distillation_partner("vp_deit_small_distilled_patch16_224") == "vp_vit_small_patch16_224"
    records = [evaluation_record("vit_tiny_patch4_32", 0.70), evaluation_record("deit_tiny_distilled_patch4_32", 0.75),
               evaluation_record("deit_small_distilled_patch4_32", 0.8)]
    gains = distillation_gains(records)
    assert gains["deit_tiny_distilled_patch4_32"] == pytest.approx(5.0)
    assert gains["deit_small_distilled_patch4_32"] is None  # no vit_small in the run
    assert gains["vit_tiny_patch4_32"] is None


@pytest.fixture(scope="module")
def report(tmp_path_factory, subset_shards):
    config = tiny_config(tmp_path_factory.mktemp("report"), subset_shards)
    weights = save_random_weights(config, scramble=True)
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_acc": 0.1 * e, "images_per_s": 500.0} for e in (1, 2, 3)]
    for path in weights.values():
        (path.parent / "metrics.json").write_text(json.dumps({"history": history, "train_seconds": 95.0}))
    records = evaluate_models(config)
    attention_maps(config)
    return config, records, write_report(config)


def test_report_files_exist(report):
    config, _, files = report
    out = config.run_dir / "report"
    assert files["markdown"] == out / "report.md" and files["html"] == out / "report.html"
    assert set(files) == {"markdown", "html", "accuracy_vs_gflops", "accuracy_vs_throughput", "training_curves",
                          "confusion_matrices"}
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0


def test_table_lists_every_model(report):
    config, records, files = report
    text = files["markdown"].read_text()
    for record in records:
        row = re.search(rf"^\| {re.escape(record.model)} \| (.+) \|$", text, flags=re.MULTILINE)
        assert row is not None, record.model
        cells = row.group(1).split(" | ")
        assert cells[0] == "n/a"  # the shards have no validation split
        assert cells[1] == f"{record.top1 * 100:.2f}%"
        assert cells[5] == "1m 35s"  # train_seconds 95
        if record.model != "deit_tiny_distilled_patch4_32":
            assert cells[-1] == "n/a"
    deit, vit = (next(r for r in records if r.model == name)
                 for name in ("deit_tiny_distilled_patch4_32", "vit_tiny_patch4_32"))
    assert f"| {(deit.top1 - vit.top1) * 100:+.2f} |" in text
    html = files["html"].read_text()
    assert all(f"<td>{record.model}</td>" in html for record in records)


def test_plots_are_png_images(report):
    _, _, files = report
    for key, path in files.items():
        if key in ("markdown", "html"):
            continue
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert width > 100 and height > 100
            assert len(image.convert("L").getcolors(maxcolors=100_000)) > 2  # more than a blank canvas


def test_html_embeds_plots_and_attention_grids(report):
    config, _, files = report
    html = files["html"].read_text()
    # 4 plots + one attention grid per transformer, all inline so the page stands alone
    assert html.count('src="data:image/png;base64,') == 4 + len(config.model.transformers)
    assert "../attention/vit_tiny_patch4_32.png" in files["markdown"].read_text()


def test_missing_evaluation_is_named(tmp_path, subset_shards):
    config = tiny_config(tmp_path, subset_shards)
    with pytest.raises(FileNotFoundError, match="evaluation.json"):
        write_report(config)


def test_cli_report_and_evaluate_exit_codes(report, tmp_path, capsys):
    config, _, _ = report
    run_args = ["--set", "tracking.mode=disabled", "--run-name", config.tracking.run_name]
    assert main(["report", "--set", f"tracking.output_dir={config.tracking.output_dir}", *run_args]) == 0
    assert str(config.run_dir / "report" / "report.html") in capsys.readouterr().out
    empty = ["--set", f"tracking.output_dir={tmp_path}", *run_args]
    assert main(["report", *empty]) == EXIT_BAD_INPUT
    assert main(["evaluate", *empty, "--shards", str(config.shard_location)]) == EXIT_BAD_INPUT
    assert "best.safetensors" in capsys.readouterr().err
