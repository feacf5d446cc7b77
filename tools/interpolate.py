#!/usr/bin/env python
"""Average a finished fine-tuning run with the model it started from (WiSE-FT), after the fact.

    python tools/interpolate.py --start START.pt --tuned runs/RUN --alpha 0.5 --output runs/RUN_wise

What ``train.interpolate`` does at the end of a run, for a run that is already over (trained on a
lent GPU, say): the weights ``(1 - alpha) * start + alpha * tuned``, the decision threshold chosen
again on the tuned run's validation split, the test split scored; writes a run folder (``model.pt``,
``metrics.json``, ``test_predictions.csv``, ``config.yaml``, ``split.csv``) that ``experiments/loso.py
--runs`` and ``predict.py --checkpoint`` take. ``--start`` must be where that fine-tuning started
(the end of its frozen stage, or the model it was started from): averaging unrelated models fails.
``--path-map OLD=NEW`` rewrites the beginning of the split's paths (a run made on another machine).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from crack_lightning.cli.run_tools import run_folder_tool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True, help="the model the fine-tuning started from (.pt/.ckpt)")
    ap.add_argument("--tuned", required=True, help="the finished run folder (model.pt, config.yaml, split.csv)")
    ap.add_argument("--alpha", type=float, default=0.5, help="share of the fine-tuned weights (default 0.5)")
    ap.add_argument("--output", required=True, help="the new run folder (must not exist)")
    return run_folder_tool(ap, run, argv)


def run(args: argparse.Namespace) -> int:
    from crack_lightning.cli.run_tools import read_run_split
    from crack_lightning.config.files import dump_yaml, load_config
    from crack_lightning.console import quiet_lightning
    from crack_lightning.data.datamodule import CrackDataModule
    from crack_lightning.data.records import write_split_csv
    from crack_lightning.errors import ConfigError
    from crack_lightning.files import write_json, write_text
    from crack_lightning.models.checkpoint import load_model
    from crack_lightning.training.recipe import finish
    from crack_lightning.training.wise import interpolate

    tuned_dir, out = Path(args.tuned), Path(args.output)
    if out.exists():
        raise ConfigError(f"{out} exists: choose a new --output folder")
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {args.alpha}")
    records = read_run_split(tuned_dir, args.path_map, need=("val", "test"))
    with quiet_lightning():
        cfg = load_config(tuned_dir / "config.yaml", [
            ("output_dir", str(out.parent)), ("run_name", out.name), ("train.interpolate", str(args.alpha)),
            ("trainer.precision", "32-true"), ("data.num_workers", str(args.num_workers))])
        start, model = load_model(args.start), load_model(tuned_dir / "model.pt", trainable=True)
        model.load_state_dict(interpolate(start.state_dict(), model.state_dict(), args.alpha))
        out.mkdir(parents=True)
        write_text(out / "config.yaml", dump_yaml(cfg))
        write_split_csv(records, out / "split.csv", cfg.data.class_names)
        if (tuned_dir / "train_wall_s.txt").is_file():  # the training it took, for experiments/loso.py
            shutil.copy(tuned_dir / "train_wall_s.txt", out / "train_wall_s.txt")
        dm = CrackDataModule(cfg.data, records=records, pre=model.pre, run_dir=out)
        dm.setup("test")
        result = {"run_dir": str(out), "start": str(args.start), "tuned": str(tuned_dir), "interpolate": args.alpha}
        result = finish(cfg, model, dm, out, result)
        write_json(out / "metrics.json", result)
        m = result["after"]
        print(f"alpha {args.alpha}: threshold {result['threshold']:.3f}, val F1 {m['val']['f1']:.4f}"
              + (f", test acc {m['test']['acc']:.4f}" if "test" in m else "") + f" -> {out / 'model.pt'}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
