"""Command-line plumbing shared by ``train.py`` and ``predict.py``: one clear line per user mistake."""
from __future__ import annotations

import errno
import sys
from typing import Callable

from .config import dump_yaml, load_config, parse_overrides
from .errors import ConfigError, UserError
from .io import path_text

# only light modules above: a mistake in the command line or a config file is reported without torch
USER_ERRORS = (UserError, PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# a disk that fills up, a quota, a read-only or vanished file system: the user's to fix, not a bug
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.ENAMETOOLONG}

TRAIN_USAGE = """usage: python train.py [--config FILE.yaml] [--print_config] [--resume] [--section.key VALUE ...]

Train, evaluate and save a crack classifier. Any config key can be overridden
with --section.key VALUE, e.g. --data.root DIR --train.frozen.epochs 5 --trainer.devices 2
--trainer.strategy ddp --trainer.gradient_clip_val 1.0. Every lightning.Trainer argument is a
trainer.* key; trainer.max_epochs caps the whole run (both stages together). --print_config
shows the resolved config and exits; --resume continues --run_name NAME. Keys (parsed by
jsonargparse, as LightningCLI does; docs/configuration.md holds this list):
"""


def guarded(main: Callable[[], int]) -> int:
    """Run ``main``; turn known user errors into ``error: <message>`` and exit code 2."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 must never crash a print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return main()
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (*USER_ERRORS, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, USER_ERRORS) and exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        msg = str(exc)
        if isinstance(exc, OSError) and exc.strerror:
            msg = f"{exc.strerror}: {path_text(exc.filename)}" if exc.filename else exc.strerror
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                msg += " (nothing half-written was left in place of an output; free space and run again)"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: a run that finished an epoch keeps its checkpoints (continue with the same command "
              "plus --resume --run_name NAME); one that had not is removed", file=sys.stderr)
        return 130


def run_folder_tool(ap, run: Callable, argv: list[str] | None = None) -> int:
    """The tools that rework a finished run folder (tools/interpolate.py, tools/anchors.py): their shared
    options (``--path-map`` for a run made on another machine, ``--num-workers``), errors as :func:`guarded`."""
    ap.add_argument("--path-map", nargs="*", default=[], metavar="OLD=NEW",
                    help="rewrite the beginning of the split's paths (a run made on another machine)")
    ap.add_argument("--num-workers", type=int, default=2)
    args = ap.parse_args(argv)
    return guarded(lambda: run(args))


def train_entry() -> None:
    """``crack-train``: ``train.py`` as an installed command."""
    sys.exit(guarded(lambda: train_main(sys.argv[1:])))


def predict_entry() -> None:
    """``crack-predict``: ``predict.py`` as an installed command."""
    sys.exit(guarded(lambda: predict_main(sys.argv[1:])))


def serve_entry() -> None:
    """``crack-serve``: ``serve.py`` as an installed command."""
    from .server import serve_main

    sys.exit(guarded(lambda: serve_main(sys.argv[1:])))


def train_main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        from .config import config_help

        print(TRAIN_USAGE + "\n" + config_help(), end="")
        return 0
    config_path, resume, print_only, rest = None, False, False, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            if "=" in a:
                config_path = a.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file")
                config_path = argv[i + 1]
                i += 1
        elif a == "--resume":
            resume = True
        elif a == "--print_config":
            print_only = True
        else:
            rest.append(a)
        i += 1
    cfg = load_config(config_path, parse_overrides(rest))
    if print_only:
        print(dump_yaml(cfg), end="")
        return 0
    if resume and not cfg.run_name:
        raise ConfigError("--resume needs the run to continue: pass --run_name NAME (the folder under output_dir)")
    import signal

    from .training import train

    def _terminate(signum, frame):  # SIGTERM (e.g. a scheduler's kill) ends the run like Ctrl+C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    result = train(cfg, resume=resume)
    test = result["after"].get("test")
    from .training import is_global_zero

    if test and is_global_zero():  # under DDP every process returns here: one line for the user
        print(f"test accuracy {test['acc']:.4f}  F1 {test['f1']:.4f}  (before training: "
              f"{result['before']['test']['acc']:.4f})  -> {result['run_dir']}")
    return 0


def predict_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="predict.py", description="Predict crack / no crack for image files, folders (recursive) and globs.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", default=None,
                   help="model: .pt release, .ckpt training checkpoint or exported .onnx (default: models/crack_lite0.pt)")
    p.add_argument("--output", default=None,
                   help="CSV to write (default predictions.csv); with --localize/--explain a folder")
    p.add_argument("--localize", action="store_true",
                   help="inputs are full-size photos: slide over tiles, write tiles CSV + heatmap + summary.csv")
    p.add_argument("--tile", type=int, default=227, help="--localize tile size in pixels (training scale: 227)")
    p.add_argument("--stride", type=int, default=0, help="--localize stride (default: tile/2, i.e. 50%% overlap)")
    p.add_argument("--explain", action="store_true", help="write a Grad-CAM PNG for each input patch")
    p.add_argument("--split", default=None, metavar="SPLIT_CSV[:NAME]",
                   help="also predict the images of a run's split.csv (default split: test)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write the evaluation report (PNG plots + report.json) for labelled inputs to DIR")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="export the checkpoint to DIR as ONNX + TorchScript + contract JSON, then exit")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="auto: ONNX Runtime on CPU (2-3x faster), PyTorch on GPU")
    p.add_argument("--batch-size", type=int, default=0, help="default: 32 on a CPU, 256 on a GPU")
    p.add_argument("--workers", type=int, default=-1,
                   help="decode worker processes (default: 1 on a CPU; on a GPU, cores - 1 up to 16)")
    p.add_argument("--threshold", type=float, default=None, help="override the threshold stored in the checkpoint")
    p.add_argument("--calibrate-site", default=None, metavar="OUT.pt",
                   help="the INPUTs are photos of one site that show NO crack: write OUT.pt, the model adapted to "
                        "them (--calibrate-mode), its threshold just above every one of them (with --localize: "
                        "above every tile), then exit")
    p.add_argument("--calibrate-mode", default="head", choices=["head", "threshold"],
                   help="head (default): refit the linear head on the photos plus the training anchors the model "
                        "file carries, then the threshold; threshold: move the threshold only (weights unchanged)")
    dist = p.add_argument_group("spread over processes, GPUs and nodes (Lightning DDP; one CSV, in input order)")
    dist.add_argument("--accelerator", default=None, choices=["cpu", "gpu", "cuda", "auto"],
                      help="run Lightning's Trainer.predict on this accelerator (instead of --device)")
    dist.add_argument("--devices", default=None, help="processes (CPU) or GPUs per node: N, or 'auto'")
    dist.add_argument("--num_nodes", type=int, default=1, help="nodes (the --output folder must be shared)")
    return p


def _split_inputs(spec: str) -> list[str]:
    from pathlib import Path

    from .data import read_split_csv

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
    from pathlib import Path

    from .io import check_output_dir, check_output_file, csv_starts_with, json_with_keys, write_json, written_by_us
    from .localize import PHOTO_CSV_HEADERS
    from .predict import DEFAULT_CHECKPOINT, PREDICTIONS_HEADER, Predictor, collect_inputs, compare, write_rows

    parser = predict_parser()
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    model_files = [checkpoint, checkpoint.with_suffix(".json")]  # an .onnx travels with its contract
    if args.export:
        from .export import EXPORT_FILES, export

        check_output_dir(args.export, "--export")
        contract = Path(args.export) / "model.json"  # an earlier export of ours is recognised by its contract
        ours = lambda _: json_with_keys("preprocessing", "threshold", "class_names")(contract)  # noqa: E731
        for name in EXPORT_FILES:
            check_output_file(Path(args.export) / name, model_files, "--export", ours=ours)
        paths = export(checkpoint, args.export)
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0
    inputs = list(args.inputs) + (_split_inputs(args.split) if args.split else [])
    if not inputs:
        parser.error("give at least one INPUT (or --split / --export)")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.batch_size < 0 or args.workers < -1:
        raise ConfigError("--batch-size must be >= 1 (0: automatic) and --workers >= 0 (-1: automatic)")
    if args.tile < 32 or args.stride < 0:
        raise ConfigError("--tile must be >= 32 and --stride >= 0")
    paths = collect_inputs(inputs)
    if args.calibrate_site:
        from .calibrate import calibrate_site, is_release, report

        target = check_output_file(args.calibrate_site, [*paths, *model_files], "--calibrate-site", ours=is_release)
        report(calibrate_site(checkpoint, paths, target, localize=args.localize, tile=args.tile,
                              stride=args.stride or None, device=args.device, mode=args.calibrate_mode), target)
        return 0
    per_photo = args.localize or args.explain
    out = Path(args.output or ("localization" if args.localize else "explanations" if args.explain
                               else "predictions.csv"))
    # every output is checked before any work: writable, not an input, not the model, not a stranger's file
    protected = [*paths, *model_files]
    if per_photo:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output must be a folder with --localize/--explain: {path_text(out)} is a file")
        check_output_dir(out)
        outputs = _photo_outputs(paths, out, args.localize)
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
    distributed = args.accelerator is not None or args.devices is not None or args.num_nodes != 1
    kwargs = dict(checkpoint=checkpoint, batch_size=args.batch_size, num_workers=args.workers,
                  threshold=args.threshold, engine=args.engine)  # the same model settings in every process
    if distributed:
        if per_photo:
            raise ConfigError("--accelerator/--devices/--num_nodes spread predict.py's CSV; "
                              "--localize and --explain run in one process (use --device)")
        devices = _devices_arg(args.devices)
        if args.num_nodes < 1:
            raise ConfigError(f"--num_nodes must be >= 1, got {args.num_nodes}")
        from .distributed import predict_distributed

        shards = out.parent / f".{out.name}.shards"
        rows, predictor = predict_distributed(paths, kwargs, shards, args.accelerator or "auto", devices,
                                              args.num_nodes)
        if rows is None:  # not global rank 0: rank 0 writes the results
            return 0
        rows = write_rows(rows, out)
    else:
        predictor = Predictor(device=args.device, **kwargs)
        if per_photo:
            return (_localize if args.localize else _explain)(predictor, paths, outputs, out, args)
        rows = write_rows(predictor.iter_rows(paths), out)
    errors = [r for r in rows if r.error]
    names = predictor.class_names
    positives = sum(r.label == names[1] for r in rows)
    print(f"{len(rows)} image(s): {positives} {names[1]}, {len(rows) - positives - len(errors)} "
          f"{names[0]}, {len(errors)} unreadable (threshold {predictor.threshold:.3f}) -> {out}")
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
        from .report import make_report

        make_report([r.path for r in known], [r.probability for r in known],
                    [names.index(r.true_label) for r in known], predictor.threshold, args.report, names,
                    title=Path(str(predictor.checkpoint)).name)
        print(f"report -> {args.report}")
    for r in errors[:10]:
        print(f"  unreadable: {r.path}: {r.error}", file=sys.stderr)
    return 1 if errors else 0


def _unique_stem(path, used: set) -> str:
    stem = path.stem
    n = 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


REPORT_FILES = ("confusion_matrix.png", "roc.png", "precision_recall.png", "histogram.png", "mistakes.png",
                "report.json")


def _photo_outputs(paths, out_dir, localize: bool) -> list[tuple]:
    """The files ``--localize`` (tiles CSV, heatmap; summary.csv) or ``--explain`` (Grad-CAM) will write per photo."""
    used: set = set()
    stems = [_unique_stem(p, used) for p in paths]
    if localize:
        return [(out_dir / f"{s}_tiles.csv", out_dir / f"{s}_heatmap.png") for s in stems] + \
            [(out_dir / "summary.csv",)]
    return [(out_dir / f"{s}_gradcam.png",) for s in stems]


def _localize(predictor, paths, outputs, out_dir, args) -> int:
    from .images import BadImageError
    from .localize import localize, summary_row, write_heatmap, write_summary, write_tiles_csv

    rows, failed = [], 0
    for path, (tiles_csv, heatmap) in zip(paths, outputs):
        try:
            loc, image = localize(path, predictor, args.tile, args.stride or None, progress=True)
        except BadImageError as exc:
            failed += 1
            rows.append({"photo": str(path), "error": str(exc)})
            print(f"  unreadable: {path_text(path)}: {exc}", file=sys.stderr)
        else:
            write_tiles_csv(loc, tiles_csv)
            write_heatmap(loc, image, heatmap)
            row = summary_row(loc)
            rows.append(row)
            print(f"{path_text(path)}: {row['crack_tiles']}/{row['tiles']} crack tiles, "
                  f"{float(row['crack_fraction']):.1%} of the surface -> {path_text(heatmap)}")
        write_summary(rows, out_dir / "summary.csv")  # after every photo: an interruption keeps what is done
    return 1 if failed else 0


def _explain(predictor, paths, outputs, out_dir, args) -> int:
    import torch

    from .explain import explain_file
    from .images import BadImageError

    if not isinstance(predictor.model, torch.nn.Module):
        raise ConfigError("--explain needs a PyTorch checkpoint (.pt/.ckpt), not an exported model")
    failed = 0
    for path, (out,) in zip(paths, outputs):
        try:
            prob = explain_file(predictor.model, path, out)
        except BadImageError as exc:
            failed += 1
            print(f"  unreadable: {path}: {exc}", file=sys.stderr)
            continue
        print(f"{path}: p(crack)={prob:.3f} -> {out}")
    return 1 if failed else 0
