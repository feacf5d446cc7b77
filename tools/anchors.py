#!/usr/bin/env python
"""Store training anchors in a model trained before runs stored them, for ``--calibrate-site``.

    python tools/anchors.py --run runs/RUN --output RUN_anchored.pt [--model OTHER.pt] [--path-map OLD=NEW]

``predict.py --calibrate-site`` refits the model's head against the features of up to 2,048 training
tiles stored in the release file (every run since they existed writes them). This computes them for
an older model: the features, under the model's own weights, of the training tiles of the run's
``split.csv`` (chosen as a run would choose them), written with the model to ``--output``. ``--model``
is the run's ``model.pt`` unless given (e.g. a released copy of it). ``--path-map OLD=NEW`` rewrites the
beginning of the split's paths (a run made on another machine).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crack_lightning.cli.run_tools import run_folder_tool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run folder the model was trained in (split.csv, config.yaml)")
    ap.add_argument("--model", default=None, help="the model file (default: RUN/model.pt)")
    ap.add_argument("--output", required=True, help="the new model file (must not exist)")
    return run_folder_tool(ap, run, argv)


def run(args: argparse.Namespace) -> int:
    from crack_lightning.cli.run_tools import read_run_split
    from crack_lightning.config.files import load_config
    from crack_lightning.console import quiet_lightning
    from crack_lightning.data.datamodule import CrackDataModule
    from crack_lightning.errors import ConfigError
    from crack_lightning.files import path_text
    from crack_lightning.models.checkpoint import load_model, save_release
    from crack_lightning.training.features import site_anchors

    run_dir, out = Path(args.run), Path(args.output)
    model_file = Path(args.model) if args.model else run_dir / "model.pt"
    if out.exists():
        raise ConfigError(f"{path_text(out)} exists: choose a new --output file")
    records = read_run_split(run_dir, args.path_map, need=("train",))
    with quiet_lightning():
        cfg = load_config(run_dir / "config.yaml", [("data.num_workers", str(args.num_workers))])
        model = load_model(model_file)
        dm = CrackDataModule(cfg.data, records=records, pre=model.pre, run_dir=run_dir)
        anchors = site_anchors(cfg, model, dm)
        if anchors is None:
            raise ConfigError(f"{path_text(model_file)}: no anchors to store (its head is not one linear layer, "
                              "or the split has no training rows)")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_release(model, out, metrics=model.meta.get("metrics"), anchors=anchors)
        print(f"{len(anchors['labels'])} training anchors ({int(anchors['labels'].sum())} crack) stored -> {path_text(out)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
