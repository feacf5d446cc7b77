"""Command-line plumbing shared by ``train.py`` and ``predict.py``: one clear line per user mistake."""
from __future__ import annotations

import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError, dump_yaml, load_config, parse_overrides
from .data import DataError
from .images import BadImageError
from .predict import InputError
from .weights import WeightsError

USER_ERRORS = (ConfigError, DataError, InputError, WeightsError, CheckpointError, BadImageError, PermissionError,
               FileNotFoundError, NotADirectoryError, IsADirectoryError)

TRAIN_USAGE = """usage: python train.py [--config FILE.yaml] [--print_config] [--resume] [--section.key VALUE ...]

Train, evaluate and save a crack classifier. Any config key can be overridden
with --section.key VALUE, e.g. --data.root DIR --train.frozen.epochs 5 --trainer.devices 2
--trainer.strategy ddp. --print_config shows the resolved config and exits.
"""


def guarded(main: Callable[[], int]) -> int:
    """Run ``main``; turn known user errors into ``error: <message>`` and exit code 2."""
    try:
        return main()
    except USER_ERRORS as exc:
        msg = str(exc)
        if isinstance(exc, OSError) and exc.filename:
            msg = f"{exc.strerror}: {exc.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is kept; re-run with --resume to continue", file=sys.stderr)
        return 130


def train_main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(TRAIN_USAGE)
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
    from .training import train

    result = train(cfg, resume=resume)
    test = result["after"].get("test")
    if test:
        print(f"test accuracy {test['acc']:.4f}  F1 {test['f1']:.4f}  (before training: "
              f"{result['before']['test']['acc']:.4f})  -> {result['run_dir']}")
    return 0


def predict_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="predict.py", description="Predict crack / no crack for image files, folders (recursive) and globs.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", default=None, help="model file (.pt release or .ckpt); default: models/crack_lite0.pt")
    p.add_argument("--output", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decode worker processes")
    p.add_argument("--threshold", type=float, default=None, help="override the threshold stored in the checkpoint")
    return p


def predict_main(argv: list[str]) -> int:
    """Exit code: 0 all images predicted, 1 some files could not be read (error rows), 2 user error."""
    from pathlib import Path

    from .io import write_json
    from .predict import Predictor, collect_inputs, compare, write_rows

    args = predict_parser().parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"--output must be a file path, {out} is a folder")
    paths = collect_inputs(args.inputs)
    predictor = Predictor(args.checkpoint, args.device, args.batch_size, args.workers, args.threshold)
    rows = write_rows(predictor.iter_rows(paths), out)
    errors = [r for r in rows if r.error]
    positives = sum(r.label == predictor.class_names[1] for r in rows)
    print(f"{len(rows)} image(s): {positives} {predictor.class_names[1]}, {len(rows) - positives - len(errors)} "
          f"{predictor.class_names[0]}, {len(errors)} unreadable (threshold {predictor.threshold:.3f}) -> {out}")
    metrics = compare(rows, predictor.class_names, predictor.threshold)
    if metrics:
        print(f"vs folder labels ({metrics['n']} images): accuracy {metrics['acc']:.4f}  precision "
              f"{metrics['precision']:.4f}  recall {metrics['recall']:.4f}  F1 {metrics['f1']:.4f}")
        print(f"confusion matrix [rows true {predictor.class_names}, cols predicted]: "
              f"[[{metrics['tn']}, {metrics['fp']}], [{metrics['fn']}, {metrics['tp']}]]")
        write_json(out.with_suffix(".metrics.json"), metrics)
    for r in errors[:10]:
        print(f"  unreadable: {r.path}: {r.error}", file=sys.stderr)
    return 1 if errors else 0
