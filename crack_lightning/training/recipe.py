"""The training recipe, end to end (what ``train.py`` runs).

1. build the model (fails fast if pretrained weights cannot be had),
2. scan + split the data without duplicate leaks (``split.csv``),
3. evaluate on validation and test BEFORE training (the baseline),
4. stage ``frozen``: backbone frozen, head trained (optionally on cached features),
5. stage ``finetune``: backbone unfrozen at a lower learning rate (if epochs > 0), its
   result optionally averaged with where it started (``train.interpolate``, WiSE-FT:
   the classifier in ``model.weights_file`` if it is one, else the end of the frozen stage),
6. test the best checkpoint; write ``metrics.json``, ``test_predictions.csv``,
   ``model.pt`` (slim release checkpoint) and the model summary.

Each stage keeps ``last.ckpt`` every epoch, so ``--resume`` (or re-running with
the same ``run_name``) continues where an interrupted run stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities.model_summary import ModelSummary

from crack_lightning.config.files import dump_yaml
from crack_lightning.config.schema import Config
from crack_lightning.console import quiet_lightning
from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.records import Record, class_counts
from crack_lightning.errors import ConfigError
from crack_lightning.files import (
    atomic_write,
    csv_path,
    csv_text,
    path_text,
    write_json,
    write_text,
)
from crack_lightning.hardware import hardware, multi_node_problem
from crack_lightning.models.checkpoint import read_checkpoint, save_release
from crack_lightning.models.classifier import CrackClassifier
from crack_lightning.models.network import model_arguments
from crack_lightning.training.callbacks import (
    EpochTimer,
    EvaluationResults,
)
from crack_lightning.training.features import (
    feature_device,
    feature_extractor,
    site_anchors,
)
from crack_lightning.training.run_folder import (
    RunLock,
    check_resume,
    check_run_dir,
    is_global_zero,
    newest_readable,
    read_done,
    run_dir_for,
)
from crack_lightning.training.trainer import make_trainer
from crack_lightning.training.wise import interpolate, started_from


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """The model's constructor arguments from the config: every ``model.*`` key, the ``train.*`` keys that
    share a constructor argument's name, the class names, and the first stage's optimiser settings;
    :func:`~crack_lightning.models.network.model_arguments` (the signature) decides which."""
    t = cfg.train
    given = {**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)}, **dataclasses.asdict(cfg.model),
             "class_names": list(cfg.data.class_names), "lr": t.frozen.lr, "weight_decay": t.frozen.weight_decay}
    return {k: v for k, v in given.items() if k in model_arguments()}


def build_model(cfg: Config) -> CrackClassifier:
    return CrackClassifier(**model_kwargs(cfg))


def evaluate(cfg: Config, model: CrackClassifier, dm: CrackDataModule, run_dir: Path) -> dict[str, dict]:
    """Validation and test results of ``model`` as it is now (``{split: {"metrics", "index", "probs",
    "labels"}}``), on what the DataModule serves (cached features while the backbone is frozen and
    cached, images otherwise)."""
    trainer = make_trainer(cfg, run_dir, None)
    found = next(c for c in trainer.callbacks if isinstance(c, EvaluationResults))
    for split in ("val", "test"):
        if dm.split(split):
            run = trainer.validate if split == "val" else trainer.test
            run(model, getattr(dm, f"{split}_dataloader")(), verbose=False)
    return found.results


def metrics_of(results: dict[str, dict]) -> dict[str, dict]:
    return {split: r["metrics"] for split, r in results.items()}


def _load_weights(model: CrackClassifier, ckpt_path: str | Path) -> None:
    model.load_state_dict(read_checkpoint(ckpt_path)["state_dict"])


def run_stage(cfg: Config, model: CrackClassifier, dm: CrackDataModule, run_dir: Path, stage: str,
              resume: bool, epoch_budget: int | None = None) -> dict:
    """Fit one stage for at most its own epochs and ``epoch_budget`` (what ``trainer.max_epochs``
    leaves of the run); return where its best checkpoint is. Skips a stage already finished."""
    sc = getattr(cfg.train, stage)
    folder = run_dir / "checkpoints" / stage
    done = folder / "done.json"
    if resume and done.is_file():
        info = read_done(done)
        _load_weights(model, run_dir / info["best"])
        return info
    model.configure_stage(frozen=stage == "frozen", lr=sc.lr, weight_decay=sc.weight_decay)
    epochs = sc.epochs if epoch_budget is None else min(sc.epochs, epoch_budget)
    resume_from, resumed_epoch = None, -1
    if resume:
        resume_from, resumed_epoch, problems = newest_readable([folder / "last.ckpt", folder / "best.ckpt"])
        for problem in problems:
            print(f"warning: skipping a damaged checkpoint: {problem}", file=sys.stderr)
        if problems and resume_from:
            print(f"resuming stage {stage} from {path_text(resume_from)}", file=sys.stderr)
    start_epoch = resumed_epoch + 1  # 0 when starting fresh
    trainer = make_trainer(cfg, run_dir, stage, epochs, sc.patience, keep_until_epoch=start_epoch - 1)
    trainer.fit(model, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    ckpt_cb = trainer.checkpoint_callback
    # this run's own files, never the paths Lightning restored from a checkpoint (a copied run's point to
    # the run it was copied from)
    best = next((f for f in (folder / "best.ckpt", folder / "last.ckpt") if f.is_file()), None)
    if best:
        _load_weights(model, best)
        best = best.relative_to(run_dir).as_posix()  # the run folder can be moved or copied
    score = ckpt_cb.best_model_score
    timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
    info = {"best": best, "resumed_from_epoch": start_epoch, "best_score": None if score is None else float(score),
            "epochs_run": trainer.current_epoch, "stopped_early": trainer.current_epoch < epochs,
            "world_size": trainer.world_size, "epoch_times": timer.epochs}
    if trainer.is_global_zero:
        write_json(done, info)
    return info


def write_predictions(path: Path, records: list[Record], result: dict, class_names: list[str]) -> None:
    """Label-vs-prediction table of the test split."""
    thr = result["metrics"]["threshold"]
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "probability", "prediction", "correct", "box", "source"])
        rows = sorted(zip(result["index"].tolist(), result["probs"].tolist()),
                      key=lambda t: (records[t[0]].path, records[t[0]].box))
        for i, p in rows:
            r = records[i]
            pred = int(p >= thr)
            w.writerow([csv_path(r.path), csv_text(class_names[r.label]), f"{p:.6f}", csv_text(class_names[pred]),
                        int(pred == r.label), r.box, csv_text(r.source)])


def train(cfg: Config, resume: bool = False) -> dict:
    """Run the whole recipe (``task: segment``: :func:`~crack_lightning.training.segment.train_segmenter`);
    return the metrics written to ``metrics.json``."""
    with quiet_lightning():
        if cfg.task == "segment":
            from crack_lightning.training.segment import train_segmenter

            return _locked(cfg, resume, train_segmenter)
        return _locked(cfg, resume, _train)


def _locked(cfg: Config, resume: bool, recipe: Callable[[Config, Path, bool, float], dict]) -> dict:
    """The run, holding its folder's lock; a run that stopped before its first checkpoint leaves no folder."""
    start = time.time()
    if (cfg.trainer.num_nodes or 1) > 1 and multi_node_problem():
        raise ConfigError(f"trainer.num_nodes {cfg.trainer.num_nodes}: {multi_node_problem()}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = run_dir_for(cfg)
    created = not run_dir.exists()
    lock = RunLock(run_dir)
    try:
        if is_global_zero():
            if not run_dir.exists():
                try:
                    run_dir.mkdir(parents=True)
                except FileExistsError:  # another run just made it: the lock decides
                    pass
                except OSError as exc:
                    raise ConfigError(f"cannot write to the output folder {path_text(run_dir)}: "
                                      f"{exc.strerror or exc}") from exc
            lock.acquire()  # first: a run in progress is reported as such, whatever its folder holds yet
            check_run_dir(run_dir, resume)
            if resume:
                check_resume(cfg, run_dir)
            print(f"run folder: {path_text(run_dir)}")
        return recipe(cfg, run_dir, resume, start)
    except BaseException:
        # a run that stopped before its first checkpoint (a crash, a bad file, Ctrl+C) has nothing
        # to resume: leave no folder behind that would block re-running under the same name
        if created and lock.held and not any(run_dir.glob("checkpoints/*/*.ckpt")):
            lock.release()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        lock.release()


def _train(cfg: Config, run_dir: Path, resume: bool, start: float) -> dict:
    make_trainer(cfg, run_dir, None)  # a trainer.* setting Lightning refuses stops here, before any data work
    model = build_model(cfg)
    on_gpu = feature_device(cfg).type == "cuda"
    dm = CrackDataModule(cfg.data, pre=model.pre, device_normalize=on_gpu, defer_resize=on_gpu, run_dir=run_dir)
    if is_global_zero():  # DDP workers start later and read the split rank 0 wrote
        dm.prepare_data()
    dm.setup("fit")
    if is_global_zero():
        write_text(run_dir / "config.yaml", dump_yaml(cfg))
        write_text(run_dir / "model_summary.txt", f"{ModelSummary(model, max_depth=2)}\n\n{model}\n")

    features_file = run_dir / "features.pt"  # rank 0's feature cache, read by DDP workers
    if cfg.train.cache_features and cfg.train.frozen.epochs > 0:
        model.freeze_backbone(True)
        dm.cache_features(lambda: feature_extractor(model, cfg.train.feature_engine, feature_device(cfg)),
                          cfg.train.feature_views, features_file, is_global_zero())

    before = metrics_of(evaluate(cfg, model, dm, run_dir))
    stages = {}
    budget = cfg.trainer.max_epochs  # Lightning's meaning: the most epochs this run trains, stages together
    for stage in ("frozen", "finetune"):
        if getattr(cfg.train, stage).epochs > 0 and (budget is None or budget > 0):
            if stage == "finetune":
                dm.serve_images()  # the backbone will change: cached features would no longer describe it
                start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stages[stage] = run_stage(cfg, model, dm, run_dir, stage, resume, budget)
            if budget is not None:
                budget -= stages[stage]["epochs_run"]
    if "finetune" in stages and cfg.train.interpolate < 1.0:
        # WiSE-FT: part of the way back to where fine-tuning started keeps what the start knew
        start_weights = started_from(cfg, model) or start_weights
        model.load_state_dict(interpolate(start_weights, model.state_dict(), cfg.train.interpolate))
    result = {
        "run_dir": str(run_dir), "backbone": cfg.model.backbone, "hardware": hardware(),
        "before": before, "stages": stages, "interpolate": cfg.train.interpolate,
    }
    result = finish(cfg, model, dm, run_dir, result)
    result["wall_time_s"] = round(time.time() - start, 1)
    if is_global_zero():
        write_json(run_dir / "metrics.json", result)
        features_file.unlink(missing_ok=True)  # only the workers of this run needed it
    return result


def finish(cfg: Config, model: CrackClassifier, dm: CrackDataModule, run_dir: Path, result: dict) -> dict:
    """The end of every run: evaluate the final weights (validation chooses the threshold), write
    ``test_predictions.csv`` and the release ``model.pt``; ``result`` gains the split's ``counts``, ``after``
    and ``threshold``."""
    # with a frozen backbone the cached features ARE the backbone's output on the eval-transformed
    # images (same decode, same transform), so testing on them is exact and 10x faster on a CPU
    results = evaluate(cfg, model, dm, run_dir)
    after = metrics_of(results)
    counts = {s: {cfg.data.class_names[k]: v for k, v in c.items()} for s, c in class_counts(dm.records).items()}
    result.update(counts=counts, after=after, threshold=float(model.threshold))
    if is_global_zero():
        if "test" in after:
            write_predictions(run_dir / "test_predictions.csv", dm.split("test"), results["test"],
                              cfg.data.class_names)
        save_release(model, run_dir / "model.pt", metrics={"test": after.get("test"), "val": after.get("val")},
                     anchors=site_anchors(cfg, model, dm))
    return result
