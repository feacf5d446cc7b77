"""``predict.py``: options checked before any work, every output checked before it is written, then the library runs."""
from __future__ import annotations

import sys
from pathlib import Path

from crack_lightning.cli.guard import guarded, number
from crack_lightning.cli.photos import (
    explain_photos,
    localize_photos,
    photo_outputs,
    segment_photos,
)
from crack_lightning.errors import ConfigError
from crack_lightning.files import (
    check_output_dir,
    check_output_file,
    csv_starts_with,
    json_with_keys,
    path_text,
    write_json,
    written_by_us,
)
from crack_lightning.limits import IMAGE_SIZE, MIN_TILE


def predict_entry() -> None:
    """``crack-predict``: ``predict.py`` as an installed command."""
    sys.exit(guarded(lambda: predict_main(sys.argv[1:])))


def predict_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="predict.py", description="Predict crack / no crack for image files, folders (recursive) and globs.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--model", "--checkpoint", dest="checkpoint", default=None, metavar="NAME|FILE",
                   help="a shipped model: site (default: the Mendeley model for patches, the photo model's tiles for "
                        "larger photos), field or mendeley; or a file: .pt release, .ckpt checkpoint, exported .onnx")
    p.add_argument("--output", default=None,
                   help="CSV to write (default predictions.csv); with --localize/--explain a folder")
    p.add_argument("--localize", action="store_true",
                   help="inputs are full-size photos: slide over tiles, write tiles CSV + heatmap + summary.csv")
    p.add_argument("--tile", type=number(int, 0, IMAGE_SIZE[1]), default=0,
                   help=f"--localize tile side in pixels, at least {MIN_TILE} (default 0: a photo's own tiles, 224 and "
                        "112 px, the evidence of its answer)")
    p.add_argument("--stride", type=number(int, 0, IMAGE_SIZE[1]), default=0, help="--localize stride (default: tile/2, i.e. 50%% overlap)")
    p.add_argument("--explain", action="store_true", help="write a Grad-CAM PNG for each input patch")
    p.add_argument("--segment", action="store_true",
                   help="inputs are photos of any size: map every crack pixel and measure each crack (length, "
                        "width); writes a mask, an overlay and a cracks CSV per photo and summary.csv "
                        "(default model: models/crack_seg_lite0.pt)")
    p.add_argument("--mm-per-pixel", type=number(float, 0, low_open=True), default=None,
                   help="--segment: the photos' scale; every length and width also in mm, and a severity per crack")
    p.add_argument("--severity-mm", default="0.1,0.3", metavar="EDGES",
                   help="--segment with --mm-per-pixel: width class edges in mm (default 0.1,0.3: hairline, fine, "
                        "wide)")
    p.add_argument("--split", default=None, metavar="SPLIT_CSV[:NAME]",
                   help="also predict the images of a run's split.csv (default split: test)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write the evaluation report (PNG plots + report.json) for labelled inputs to DIR")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="export the checkpoint to DIR as ONNX + TorchScript + contract JSON, then exit")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="auto: ONNX Runtime on CPU (2-3x faster), PyTorch on GPU")
    p.add_argument("--batch-size", type=number(int, 0), default=0, help="default: 32 on a CPU, 256 on a GPU")
    p.add_argument("--workers", type=number(int, -1), default=-1,
                   help="decode worker processes (default: 1 on a CPU; on a GPU, cores - 1 up to 16)")
    p.add_argument("--threshold", type=number(float, 0, 1), default=None, help="override the threshold stored in the checkpoint")
    p.add_argument("--calibrate-site", default=None, metavar="OUT.pt",
                   help="the INPUTs are photos of one site that show NO crack: write OUT.pt, the model adapted to "
                        "them (--calibrate-mode), its threshold just above every one of them (with --localize: "
                        "above every tile), then exit")
    p.add_argument("--calibrate-anyway", action="store_true",
                   help="calibrate even on photos the model is sure show a crack (refused otherwise: they would "
                        "teach it to miss cracks)")
    p.add_argument("--calibrate-mode", default="head", choices=["head", "threshold"],
                   help="head (default): refit the linear head on the photos plus the training anchors the model "
                        "file carries, then the threshold; threshold: move the threshold only (weights unchanged)")
    dist = p.add_argument_group("spread over processes, GPUs and nodes (Lightning DDP; one CSV, in input order)")
    dist.add_argument("--accelerator", default=None, choices=["cpu", "gpu", "cuda", "auto"],
                      help="run Lightning's Trainer.predict on this accelerator (instead of --device)")
    dist.add_argument("--devices", default=None, help="processes (CPU) or GPUs per node: N, or 'auto'")
    dist.add_argument("--num_nodes", type=number(int, 1), default=1, help="nodes (the --output folder must be shared)")
    return p


def _split_inputs(spec: str) -> list[str]:
    from pathlib import Path

    from crack_lightning.data.records import read_split_csv

    path, _, name = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--split: file not found: {path}")
    try:
        rows = [r.path for r in read_split_csv(Path(path)) if r.split == (name or "test")]
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"--split: {path} is not a split.csv written by train.py") from exc
    if not rows:
        raise ConfigError(f"--split: no images of split '{name or 'test'}' in {path}")
    return rows


def _devices_arg(raw: str | None) -> int | str:
    """``--devices``: a positive count or ``auto`` (Lightning's own forms)."""
    if raw is None:
        return 1
    if raw == "auto":
        return raw
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"--devices must be a positive number or 'auto', got {raw!r}")
    return int(raw)


def predict_main(argv: list[str]) -> int:
    """Exit code: 0 all images predicted, 1 some files could not be read (error rows), 2 user error."""
    from crack_lightning.inference.outputs import (
        DEFAULT_CHECKPOINT,
        MODELS,
        SEGMENT_MODEL,
        collect_inputs,
        model_files,
    )

    parser = predict_parser()
    args = parser.parse_args(argv)  # --help and usage errors end here, before any heavy import
    patch_model, photo_model = model_files(args.checkpoint)
    # one file: what --segment, --export and --calibrate-site work on (a site's photos: the photo model)
    checkpoint = Path(args.checkpoint) if args.segment and args.checkpoint else \
        DEFAULT_CHECKPOINT.with_name(SEGMENT_MODEL) if args.segment else photo_model
    if args.export and patch_model != photo_model:
        raise ConfigError(f"--export takes one model: --model {' or --model '.join(MODELS)}, or a file")
    protected = [f for m in {patch_model, photo_model, checkpoint} for f in (m, m.with_suffix(".json"))]  # an .onnx travels with its contract
    if args.export:
        return _export(checkpoint, Path(args.export), protected)
    inputs = list(args.inputs) + (_split_inputs(args.split) if args.split else [])
    if not inputs:
        parser.error("give at least one INPUT (or --split / --export)")
    _check_options(args)
    paths = collect_inputs(inputs)
    if args.calibrate_site:
        from crack_lightning.inference.calibrate import (
            calibrate_site,
            is_site_model,
            report,
        )

        target = check_output_file(args.calibrate_site, [*paths, *protected], "--calibrate-site",
                                   ours=is_site_model)
        report(calibrate_site(checkpoint, paths, target, localize=args.localize, tile=args.tile or None,
                              stride=args.stride or None, device=args.device, mode=args.calibrate_mode,
                              threshold=args.threshold, anyway=args.calibrate_anyway), target)
        return 0
    out, outputs = _check_outputs(args, paths, [*paths, *protected])
    if args.segment:
        return segment_photos(checkpoint, paths, outputs, out, args)
    kwargs = dict(checkpoint=args.checkpoint, batch_size=args.batch_size, num_workers=args.workers,
                  threshold=args.threshold, engine=args.engine)  # the same model settings in every process
    if args.accelerator is not None or args.devices is not None or args.num_nodes != 1:
        rows, predictor = _predict_distributed(args, paths, kwargs, out)
        if rows is None:  # not global rank 0: rank 0 writes the results
            return 0
    else:
        from crack_lightning.inference.predictor import Predictor, write_rows

        predictor = Predictor(device=args.device, progress=True, **kwargs)
        if args.localize or args.explain:
            return (localize_photos if args.localize else explain_photos)(predictor, paths, outputs, out, args)
        rows = write_rows(predictor.iter_rows(paths), out)
    return _summarise(rows, predictor, out, args)


def _check_options(args) -> None:
    if args.tile and args.tile < MIN_TILE:
        raise ConfigError(f"--tile must be 0 (a photo's own tiles) or at least {MIN_TILE} pixels, got {args.tile}")
    modes = [m for m in ("localize", "explain", "segment", "export") if getattr(args, m)]
    modes += ["calibrate_site"] if args.calibrate_site and (args.explain or args.segment) else []  # it takes --localize
    if len(modes) > 1:
        raise ConfigError(f"--{modes[0].replace('_', '-')} and --{modes[1].replace('_', '-')} cannot be combined")
    if args.mm_per_pixel is not None and not args.segment:
        raise ConfigError("--mm-per-pixel applies to --segment")
    if args.report and (args.localize or args.explain or args.calibrate_site or args.segment):
        raise ConfigError("--report evaluates labelled patches (predict.py's CSV); it does not apply to "
                          "--localize, --explain or --calibrate-site: run it without them")
    if args.num_nodes > 1:
        from crack_lightning.hardware import multi_node_problem

        problem = multi_node_problem()
        if problem:
            raise ConfigError(f"--num_nodes {args.num_nodes}: {problem}")
    if (args.localize or args.explain or args.segment) and (args.accelerator is not None or args.devices is not None
                                            or args.num_nodes != 1):
        raise ConfigError("--accelerator/--devices/--num_nodes spread predict.py's CSV; "
                          "--localize and --explain run in one process (use --device)")


def _export(checkpoint: Path, folder: Path, model_files: list[Path]) -> int:
    from crack_lightning.inference.outputs import EXPORT_FILES

    check_output_dir(folder, "--export")
    contract = folder / "model.json"  # an earlier export of ours is recognised by its contract
    ours = lambda _: json_with_keys("preprocessing", "threshold", "class_names")(contract)  # noqa: E731
    for name in EXPORT_FILES:
        check_output_file(folder / name, model_files, "--export", ours=ours)
    from crack_lightning.inference.export import export

    for kind, path in export(checkpoint, folder).items():
        print(f"{kind}: {path}")
    return 0


def _check_outputs(args, paths: list[Path], protected: list[Path]) -> tuple[Path, list[tuple]]:
    """Every output, checked before any work: writable, not an input, not the model, not a stranger's file."""
    from crack_lightning.inference.outputs import (
        PHOTO_CSV_HEADERS,
        PREDICTIONS_HEADER,
        REPORT_FILES,
    )

    per_photo = args.localize or args.explain or args.segment
    out = Path(args.output or ("localization" if args.localize else "explanations" if args.explain
                               else "cracks" if args.segment else "predictions.csv"))
    outputs: list[tuple] = []
    if per_photo:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output must be a folder with --localize/--explain/--segment: {path_text(out)} "
                              "is a file")
        check_output_dir(out)
        outputs = photo_outputs(paths, out, "localize" if args.localize else "segment" if args.segment else "explain")
        for files in outputs:
            for f in files:
                check_output_file(f, protected, ours=written_by_us(PHOTO_CSV_HEADERS))
    else:
        check_output_file(out, protected, ours=csv_starts_with(PREDICTIONS_HEADER))
        check_output_file(out.with_suffix(".metrics.json"), protected, ours=json_with_keys("acc", "n", "threshold"))
    if args.report:
        check_output_dir(args.report, "--report")
        for name in REPORT_FILES:
            check_output_file(Path(args.report) / name, protected, "--report", ours=written_by_us())
    return out, outputs


def _predict_distributed(args, paths: list[Path], kwargs: dict, out: Path):
    devices = _devices_arg(args.devices)
    from crack_lightning.inference.distributed import predict_distributed, shards_ours
    from crack_lightning.inference.predictor import write_rows

    shards = out.parent / f".{out.name}.shards"
    if not shards_ours(shards):
        raise ConfigError(f"{path_text(shards)} (where the processes leave their shares) exists and holds files "
                          "crack_lightning did not write: move it away or choose another --output")
    rows, predictor = predict_distributed(paths, kwargs, shards, args.accelerator or "auto", devices, args.num_nodes)
    return (None if rows is None else write_rows(rows, out)), predictor


def _summarise(rows: list, predictor, out: Path, args) -> int:
    """The one-line summary, the comparison with folder labels (``.metrics.json``) and the report."""
    from crack_lightning.inference.predictor import compare

    errors = [r for r in rows if r.error]
    names = predictor.class_names
    positives = sum(r.label == names[1] for r in rows)
    photos = predictor.photo_threshold
    thresholds = f"threshold {predictor.threshold:.3f}" if photos is None or photos == predictor.threshold \
        else f"thresholds: {predictor.threshold:.3f} patches, {photos:.3f} photos' tiles"
    print(f"{len(rows)} image(s): {positives} {names[1]}, {len(rows) - positives - len(errors)} "
          f"{names[0]}, {len(errors)} unreadable ({thresholds}) -> {out}")
    metrics = compare(rows, names, predictor.threshold)
    if metrics:
        print(f"vs folder labels ({metrics['n']} images): accuracy {metrics['acc']:.4f}  precision "
              f"{metrics['precision']:.4f}  recall {metrics['recall']:.4f}  F1 {metrics['f1']:.4f}")
        print(f"confusion matrix [rows true {names}, cols predicted]: "
              f"[[{metrics['tn']}, {metrics['fp']}], [{metrics['fn']}, {metrics['tp']}]]")
        write_json(out.with_suffix(".metrics.json"), metrics)
    if args.report:
        known = [r for r in rows if r.true_label and r.probability is not None]
        if not known:
            raise ConfigError("--report needs labelled images (under folders named like the classes)")
        from crack_lightning.inference.report import make_report

        make_report([r.path for r in known], [r.probability for r in known],
                    [names.index(r.true_label) for r in known], predictor.threshold, args.report, names,
                    title=predictor.name)
        print(f"report -> {args.report}")
    for r in errors[:10]:
        print(f"  unreadable: {r.path}: {r.error}", file=sys.stderr)
    return 1 if errors else 0
