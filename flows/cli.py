"""`vit-pipeline`: the command line over the pipeline's steps.

Every subcommand builds the one PipelineConfig (a --config file, then --set overrides, then the
subcommand's own flags) so the CLI and the Prefect flow can never disagree about a default.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from tasks.config import EXIT_BAD_INPUT, ConfigError, PipelineConfig, load_config, with_pretrained_file
from tasks.data.manifest import verify_shards
from tasks.data.shard import shard_from_config
from tasks.errors import INPUT_ERRORS
from tasks.inference.export import EXPORT_FORMATS, ONNX_TOLERANCE, PARITY_IMAGES, TIMM_TOLERANCE, ExportError
from tasks.inference.model_ref import ModelRefError
from tasks.inference.predict import DEFAULT_BATCH_SIZE, DEFAULT_TOP_K, DEVICES, PredictInputError
from tasks.operations.publish import PublishError
from tasks.training.train import TrainingError

EXIT_VERIFY_FAILED = 1
EXIT_SKIPPED = 1  # predict: some files were not readable images (the others were classified)
# Reported by name, exit EXIT_BAD_INPUT: the message says what is wrong, a traceback would only bury it.
# Besides the user-input errors: a file named on the command line that is not there, and the training and
# publish errors, whose messages say what to do.
BAD_INPUT_ERRORS = (*INPUT_ERRORS, FileNotFoundError, TrainingError, PublishError, ModelRefError, ExportError,
                    PredictInputError)
# The loggers through which Prefect reports a step's or a flow's error, traceback included.
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _BadInputWithoutTraceback(logging.Filter):
    """Keeps Prefect's record of a bad-input error that `run` and `sweep` report themselves, without the
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BAD_INPUT_ERRORS):
            record.exc_info = None
            record.exc_text = None
        return True


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="a configs/*.yaml file (default: built-in defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set training.epochs=3 (repeatable)",
    )
    parser.add_argument("--run-name", help="outputs go under ./runs/<run name>/ (tracking.run_name)")
    parser.add_argument(
        "--flow-run", metavar="DIR",
        help="work in one flow run's directory, runs/<run name>/DIR/ ('latest': the last finished one; "
             "tracking.flow_run)",
    )


def _flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn the subcommand's explicit flags into config overrides (flags win over --set)."""
    overrides = list(args.overrides)
    for attribute, dotted in {"run_name": "tracking.run_name", "flow_run": "tracking.flow_run", **mapping}.items():
        value = getattr(args, attribute, None)
        if value is not None:
            # JSON quoting keeps a path with ':' or '#' a plain string when read back as YAML.
            overrides.append(f"{dotted}={json.dumps(value) if isinstance(value, str) else value}")
    return overrides


def _load(args: argparse.Namespace, mapping: dict[str, str]) -> PipelineConfig:
    return load_config(args.config, _flag_overrides(args, mapping))


def cmd_shard(args: argparse.Namespace) -> int:
    config = _load(
        args,
        {
            "dataset": "data.dataset",
            "data_root": "data.data_root",
            "out": "data.shard_dir",
            "shard_size": "data.shard_size",
            "image_format": "data.image_format",
            "image_size": "data.image_size",
            "workers": "data.shard_workers",
        },
    )
    result = shard_from_config(config, progress=not args.quiet)
    splits = ", ".join(
        f"{name}: {split.num_samples} samples in {len(split.shards)} shards"
        for name, split in result.manifest.splits.items()
    )
    state = "up to date, nothing to do" if result.skipped else "written"
    print(f"{result.location}: {state} ({splits}; fingerprint {result.manifest.fingerprint[:12]})")
    return 0


def cmd_verify_shards(args: argparse.Namespace) -> int:
    report = verify_shards(str(args.location))
    if report.ok:
        print(f"{report.location}: OK ({report.shards_checked} shards, {report.samples_checked} samples)")
        return 0
    for problem in report.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"{report.location}: {len(report.problems)} problem(s)", file=sys.stderr)
    return EXIT_VERIFY_FAILED


def cmd_train(args: argparse.Namespace) -> int:
    from tasks.training.train import default_teacher_weights, train_model

    config = _load(args, {"shards": "data.shard_dir", "verify_shards": "data.verify_before_training"})
    model = args.model or config.model.baseline.name
    if args.pretrained_file is not None:
        config = with_pretrained_file(config, model, args.pretrained_file)
    teacher = args.teacher_weights or default_teacher_weights(config, model)
    outcome = train_model(config, model, teacher_weights=teacher)
    last = outcome.history[-1]
    print(
        f"{model}: {len(outcome.history)} epochs, validation accuracy {last['val_acc']:.4f} "
        f"(best {outcome.best_val_acc:.4f} at epoch {outcome.best_epoch}), weights in {outcome.best_weights.parent}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole flow in this process (Prefect's ephemeral API unless PREFECT_API_URL points at a server)."""
    from flows.pipeline import vit_pipeline

    if args.flow_run:
        raise ConfigError("--flow-run: each run writes a directory of its own, runs/<run name>/<flow run>/")
    config = _load(args, {})
    result = vit_pipeline(config=config, reuse_trainings=args.reuse_trainings)
    for name, how in result["trainings"].items():
        print(f"{name}: {how}, best validation accuracy {result['models'][name]:.4f}")
    print(f"pipeline finished in {result['run_dir']}; report {result['report']['html']}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """The sweep flow in this process: Ray Tune over the config's sweep section. Started again after it was
    killed, it continues the same sweep (same config) instead of starting over."""
    from flows.run_owner import flow_run_directory
    from flows.sweep import vit_sweep
    from tasks.layout import RunLayout
    from tasks.operations.sweep import BEST_CONFIG_FILE, RESULTS_FILE, require_sweep

    if args.flow_run:
        raise ConfigError("--flow-run: each sweep writes a directory of its own, runs/<run name>/<flow run>/; "
                          "a killed sweep is continued by running the same command again")
    config = _load(args, {})
    sweep = require_sweep(config, str(args.config or "the default configuration"))
    state = vit_sweep(config=config, return_state=True)
    state.result()  # the flow's error, if it failed
    out = RunLayout(flow_run_directory(config.run_root, str(state.state_details.flow_run_id))).sweep_dir
    results = json.loads((out / RESULTS_FILE).read_text())
    for trial in results["trials"]:
        chosen = ", ".join(f"{path}={value:.4g}" if isinstance(value, float) else f"{path}={value}"
                           for path, value in trial["parameters"].items())
        score = trial[f"best_{sweep.metric}"]
        print(f"{trial['rank']}. {trial['trial']}: {sweep.metric} "
              f"{'-' if score is None else f'{score:.4f}'} ({trial['status']} after {trial['epochs']}/"
              f"{results['epochs']} epochs) {chosen}")
    print(f"sweep finished in {out}; best config {out / BEST_CONFIG_FILE} "
          f"(vit-pipeline run --config {out / BEST_CONFIG_FILE})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tasks.judging.evaluate import evaluate_models, markdown_table
    from tasks.layout import RunLayout

    config = _load(args, {"shards": "data.shard_dir"})
    layout = RunLayout.of(config)
    if args.model:
        # Only the models named, merged into evaluation.json beside the others already scored there.
        records = evaluate_models(config, {name: layout.weights(name) for name in dict.fromkeys(args.model)},
                                  merge=True)
    else:
        records = evaluate_models(config)
    print(markdown_table(records), end="")
    print(f"written to {layout.evaluation}; `vit-pipeline report` renders it")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files with a trained model; exit 1 when some files were skipped."""
    from tasks.inference.model_ref import load_model, resolve_model_ref
    from tasks.inference.predict import (
        check_output,
        choose_device,
        find_images,
        format_prediction,
        predict_images,
        write_predictions,
    )

    check_output(args.output)
    device = choose_device(args.device)
    paths, missing = find_images(args.images)
    if not paths:
        raise PredictInputError(f"no image files in {', '.join(args.images)}")
    description = resolve_model_ref(args.model)
    model = load_model(description, device)
    predictions, unreadable = predict_images(
        model, description, paths, device=device, top_k=args.top_k, batch_size=args.batch_size,
        attention_dir=args.attention, progress=not args.quiet)
    skipped = missing + unreadable
    for prediction in predictions:
        print(format_prediction(prediction))
    if args.output is not None:
        print(f"{len(predictions)} predictions written to {write_predictions(predictions, args.output)}")
    if args.attention is not None and any(p.attention for p in predictions):
        print(f"attention overlays in {args.attention}")
    if skipped:
        print(f"skipped {len(skipped)} of {len(paths) + len(missing)} files:", file=sys.stderr)
        for item in skipped:
            print(f"  {item.path}: {item.reason}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from tasks.judging.attention import attention_maps

    config = _load(args, {"shards": "data.shard_dir"})
    for model, path in attention_maps(config).items():
        print(f"{model}: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.judging.report import write_report

    config = _load(args, {})
    files = write_report(config)
    print(f"report: {files['markdown']} and {files['html']}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Link the run's best models in the W&B Registry: plan then link (online), or plan only (offline), or carry
    out a run directory's registry.json (--run-dir, after `wandb sync`)."""
    from tasks.operations.publish import publish, publish_run_command, publish_run_dir
    from tasks.operations.tracking import sync_command

    if args.run_dir is not None:
        if args.flow_run or args.run_name or args.config or args.overrides:
            raise ConfigError("--run-dir carries out DIR/registry.json as planned; it takes no --config, --set, "
                              "--run-name or --flow-run")
        linked = publish_run_dir(Path(args.run_dir))
    else:
        config = _load(args, {})
        path, linked = publish(config)
        if linked is None:
            print(f"W&B is offline: what would be linked is in {path}\n"
                  f"upload the run's W&B runs with `{sync_command(config)}`, then run `{publish_run_command(config)}`")
            return 0
    for entry in linked:
        done = entry["linked"]
        print(f"{entry['model']}: {done['version']} as {', '.join(done['aliases'])} ({done['reason']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The model as ONNX or as a folder plain timm loads, checked against PyTorch on real test images; exit 1 when
    the check fails (the files stay for inspection)."""
    from tasks.inference.export import ParityError, default_image_source, export_model, parity_images
    from tasks.inference.model_ref import resolve_model_ref

    if args.parity_images < 1 or (args.tolerance is not None and not args.tolerance > 0):
        raise ExportError(f"--parity-images {args.parity_images} and --tolerance {args.tolerance}: both must be > 0")
    description = resolve_model_ref(args.model)
    source = args.images or default_image_source(description)
    if source is None:
        raise ExportError(f"--images: {args.model} is not in a run directory with shards (runs/<run>/shards); "
                          "name test images to check the export on (a shard directory or image files)")
    images = parity_images(description, source, args.parity_images)
    try:
        result = export_model(description, args.format, args.out, images, args.tolerance)
    except ParityError as failure:
        print(f"vit-pipeline export: {failure.report.summary()}", file=sys.stderr)
        print(f"vit-pipeline export: error: {failure}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if result.format == "onnx":
        print(f"{description.architecture}: ONNX opset {result.details['opset']}, dynamic batch, in {result.out} "
              f"({', '.join(result.files)})")
    else:
        print(f"{description.architecture}: timm {result.details['architecture']} in {result.out} "
              f"({', '.join(result.files)}); load it with timm.create_model(\"local-dir:{result.out}\", "
              "pretrained=True)")
    print(result.parity.summary())
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete the run directories and checkpoints of a run name's old flow runs (tasks/operations/retention.py)."""
    from tasks.operations.retention import prune

    config = load_config(args.config, _flag_overrides(args, {}))
    retention = prune(config, args.keep, dry_run=args.dry_run)
    for name, why in sorted(retention.kept.items()):
        print(f"keep {name}: {why}")
    verb = "would delete" if args.dry_run else "deleted"
    for name, paths in sorted(retention.deleted.items()):
        print(f"{verb} {name}: {', '.join(paths)}")
    print(f"{len(retention.kept)} flow runs kept, {len(retention.deleted)} {verb}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The model behind HTTP with Ray Serve until Ctrl-C (or SIGTERM); then a Ray this command started ends at once,
    Serve with it, while on a cluster the application is deleted the way Serve does (stop_serving)."""
    import ray

    from tasks.inference.model_ref import resolve_model_ref
    from tasks.inference.serve import PREDICT_PATH, require_free_port, require_ingress, start_serving, stop_serving
    from tasks.training.train import ensure_ray, ray_address

    config = _load(args, {"host": "serving.host", "port": "serving.port"})
    description = resolve_model_ref(args.model)
    require_free_port(config.serving.host, config.serving.port)  # before Ray takes its seconds to start
    require_ingress(config)
    own_ray = ray_address(config) is None  # else a cluster's, where other applications may be served
    ensure_ray(config)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs a handler of its own that dumps a stack
    try:
        url = start_serving(description, config.serving)
        print(f"serving {args.model} at {url}{PREDICT_PATH} (POST an image file); Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping Serve", flush=True)
    finally:
        if not own_ray:  # a cluster's Serve goes on, maybe serving other applications: only ours drains and goes
            stop_serving()
        ray.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    shard = commands.add_parser("shard", help="turn a dataset into verified WebDataset shards")
    _config_arguments(shard)
    shard.add_argument("--dataset", choices=["cifar10", "imagefolder"])
    shard.add_argument("--data-root", help="dataset directory (default: $DATA_ROOT, else download CIFAR-10)")
    shard.add_argument("--out", help="shard directory or fsspec URL (default: runs/<run name>/shards)")
    shard.add_argument("--shard-size", type=int, help="samples per shard")
    shard.add_argument("--image-format", choices=["npy", "png"])
    shard.add_argument("--image-size", type=int, help="ImageFolder: resize images to this square size")
    shard.add_argument("--workers", type=int, help="shard-writing processes")
    shard.set_defaults(handler=cmd_shard)

    train = commands.add_parser("train", help="train one configured model with Ray Train DDP")
    _config_arguments(train)
    train.add_argument("--model", help="a model named in the config (default: the baseline)")
    train.add_argument("--shards", help="shard directory or URL (default: data.shard_dir or runs/<run>/shards)")
    train.add_argument("--teacher-weights", help="distillation teacher weights (default: the run's trained baseline)")
    train.add_argument("--pretrained-file", type=Path, metavar="PATH",
                       help="fine-tune --model from this checkpoint (.safetensors or torch state dict, any grid or "
                            "class count) instead of the one the config names")
    train.add_argument("--verify-shards", action="store_true", default=None,
                       help="re-read and re-hash every shard before training (data.verify_before_training); "
                            "otherwise only the manifest and the shards' sizes are checked")
    train.set_defaults(handler=cmd_train)

    run = commands.add_parser("run", help="run the whole pipeline flow (shard, train, evaluate, attention, report)")
    _config_arguments(run)
    run.add_argument("--reuse-trainings", action="store_true",
                     help="take a training from Prefect's cache when an identical one finished before")
    run.set_defaults(handler=cmd_run)

    sweep = commands.add_parser("sweep", help="search the config's sweep section with Ray Tune (ASHA), tracked in W&B")
    _config_arguments(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    shards_help = "shard directory or URL (default: data.shard_dir or runs/<run>/shards)"
    evaluate = commands.add_parser("evaluate", help="evaluate the trained models on the test split")
    _config_arguments(evaluate)
    evaluate.add_argument("--shards", help=shards_help)
    evaluate.add_argument("--model", action="append", metavar="NAME",
                          help="evaluate only this trained model of the config (repeatable), keeping the other "
                               "models' records in evaluation.json (default: every model, all trained)")
    evaluate.set_defaults(handler=cmd_evaluate)

    attention = commands.add_parser("attention", help="attention-map grids of the trained transformers")
    _config_arguments(attention)
    attention.add_argument("--shards", help=shards_help)
    attention.set_defaults(handler=cmd_attention)

    report = commands.add_parser("report", help="the comparison report from evaluation.json")
    _config_arguments(report)
    report.set_defaults(handler=cmd_report)

    publish = commands.add_parser(
        "publish", help="link the best model of each model family in the W&B Registry (offline: plan registry.json)")
    _config_arguments(publish)
    publish.add_argument("--run-dir", metavar="DIR",
                         help="carry out DIR/registry.json, planned offline, once `wandb sync` has uploaded DIR's runs")
    publish.set_defaults(handler=cmd_publish)

    predict = commands.add_parser("predict", help="classify image files with a trained model")
    predict.add_argument("--model", required=True, metavar="MODEL_REF",
                         help="a models/<name> directory, <run dir>:<name> (runs/<run>/latest:<name>), "
                              "<run dir>/registry.json:<name>, or a W&B Registry path "
                              "wandb-registry-<registry>/<collection>:<alias>")
    predict.add_argument("images", nargs="+", metavar="IMAGE",
                         help="image files, folders (searched recursively) or globs ('**' recursive)")
    predict.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="labels per image (default: %(default)s)")
    predict.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                         help="images per forward pass (default: %(default)s)")
    predict.add_argument("--output", type=Path, metavar="FILE",
                         help="also write the predictions to FILE: .csv (one row per image) or .jsonl")
    predict.add_argument("--attention", type=Path, metavar="DIR",
                         help="write each image's attention overlay (CLS per head and rollout) to DIR/<name>.png")
    predict.add_argument("--device", default="auto", choices=DEVICES,
                         help="auto: the GPU when there is one (default: %(default)s)")
    predict.set_defaults(handler=cmd_predict)

    export = commands.add_parser(
        "export", help="a trained model as ONNX or as a folder timm loads, checked on real test images")
    export.add_argument("--model", required=True, metavar="MODEL_REF",
                        help="a models/<name> directory, runs/<run>/latest:<name>, <run dir>/registry.json:<name> "
                             "or a W&B Registry path")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="onnx: model.onnx (dynamic batch) and its preprocessing; timm: model.safetensors and "
                             "config.json under timm's own architecture")
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="the folder to write")
    export.add_argument("--images", metavar="PATH",
                        help="test images to check the export on: a shard directory or URL (its test split) or "
                             "image files (default: the run's shards, runs/<run>/shards)")
    export.add_argument("--parity-images", type=int, default=PARITY_IMAGES, metavar="N",
                        help=f"how many test images (default {PARITY_IMAGES})")
    export.add_argument("--tolerance", type=float,
                        help=f"largest |Δlogit| accepted (default {ONNX_TOLERANCE:.0e} for onnx, {TIMM_TOLERANCE:.0e} "
                             "for timm, fp32)")
    export.set_defaults(handler=cmd_export)

    prune = commands.add_parser(
        "prune", help="delete old flow runs' directories and checkpoints; keep the registered and the last N")
    prune.add_argument("--config", type=Path, help="a configs/*.yaml file (where runs and checkpoints are)")
    prune.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one config field (repeatable)")
    prune.add_argument("--run-name", required=True, metavar="NAME",
                       help="the run name whose flow runs are pruned (runs/NAME/)")
    prune.add_argument("--keep", type=int, metavar="N",
                       help="how many of the last flow runs to keep (default: storage.keep_runs)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    prune.set_defaults(handler=cmd_prune)

    serve = commands.add_parser("serve", help="a trained model behind HTTP on Ray Serve (POST /predict, GET /health)")
    _config_arguments(serve)
    serve.add_argument("--model", required=True, metavar="MODEL_REF",
                       help="a models/<name> directory, <run directory>:<name> (runs/<run>/latest:<name>), "
                            "<run directory>/registry.json:<name>, or wandb-registry-<registry>/<collection>[:alias]")
    serve.add_argument("--host", help="the address to listen on (serving.host; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="the port to listen on (serving.port; default 8000)")
    serve.set_defaults(handler=cmd_serve)

    verify = commands.add_parser("verify-shards", help="re-count and re-hash shards against manifest.json")
    verify.add_argument("location", help="shard directory or fsspec URL")
    verify.set_defaults(handler=cmd_verify_shards)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    without_traceback = _BadInputWithoutTraceback()
    for name in PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(without_traceback)
    try:
        return args.handler(args)
    except BAD_INPUT_ERRORS as error:
        print(f"vit-pipeline {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        for name in PREFECT_RUN_LOGGERS:
            logging.getLogger(name).removeFilter(without_traceback)


if __name__ == "__main__":
    sys.exit(main())
