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

import copy
import csv
import datetime as dt
import io
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_summary import ModelSummary

from .checkpoint import CheckpointError, float_weights, read_checkpoint, save_release
from .config import Config, ConfigError, dump_yaml, trainer_kwargs
from .console import ProgressBar, quiet_lightning
from .data import CrackDataModule, Record, class_counts
from .io import atomic_write, csv_path, csv_text, path_text, write_json, write_text
from .model import CrackClassifier
from .weights import interpolate

RUN_NAME_ENV = "CRACK_LIGHTNING_RUN_NAME"  # shared by all DDP processes of one run


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def run_dir_for(cfg: Config) -> Path:
    """The run's folder. A DDP worker process (``LOCAL_RANK`` set by Lightning's launcher) takes the
    name its launcher chose, so that a timestamped name is the same in every process."""
    inherited = os.environ.get(RUN_NAME_ENV) if "LOCAL_RANK" in os.environ else None
    name = cfg.run_name or inherited or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.environ[RUN_NAME_ENV] = name
    return Path(cfg.output_dir) / name


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an earlier run, to resume one that is not there, or to write into a
    folder that is not a run; check we can write."""
    started = (run_dir / "config.yaml").is_file()
    if resume and not started:
        raise ConfigError(f"--resume: no run to continue in {path_text(run_dir)}")
    if not resume and started:
        raise ConfigError(f"{path_text(run_dir)} already holds a run: add --resume to continue it, or choose another "
                          "--run_name")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{path_text(run_dir)} is a file, not a run folder: choose another --run_name")
    if not started and run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise ConfigError(f"{path_text(run_dir)} exists and is not a run (it holds other files): refusing to write "
                          "into it; choose another --run_name or output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to the output folder {run_dir}: {exc.strerror or exc}") from exc


LOCK_NAME = ".lock"


class RunLock:
    """One run per folder at a time: ``run_dir/.lock`` names the holder (host, process, start).

    Taken atomically (``O_EXCL``); a lock whose process is gone (same host) is stale and taken
    over. Released when the run ends, however it ends (a ``kill -9`` leaves a stale lock).
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        import json
        import socket

        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and \
                        not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise ConfigError(f"{path_text(self.path.parent)} is in use by another run (process "
                                  f"{holder.get('pid', '?')} on {holder.get('host', '?')} since "
                                  f"{holder.get('since', '?')}); wait for it or choose another --run_name")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class InterruptNotice(Callback):
    """Tell the user how to continue after Ctrl+C / SIGTERM (Lightning then exits)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            print(f"\ninterrupted: checkpoints of finished epochs are in {self.run_dir / 'checkpoints'}; continue with "
                  f"the same command plus --resume --run_name {self.run_dir.name}", file=sys.stderr)


class EpochTimer(Callback):
    """Wall time and images of each training epoch (validation excluded), for ``done.json``.

    What users and benchmarks want to know about speed is the epoch, data
    loading included, not the model alone.
    """

    def __init__(self):
        self.epochs: list[dict[str, float]] = []
        self._t0, self._images, self._open = 0.0, 0, False

    @staticmethod
    def _now(trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._images, self._open = self._now(trainer), 0, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])

    def _close(self, trainer) -> None:
        if self._open:
            self._open = False
            seconds = self._now(trainer) - self._t0
            images = self._images * trainer.world_size
            self.epochs.append({"epoch": trainer.current_epoch, "train_s": round(seconds, 3), "images": images,
                                "images_per_s": round(images / max(seconds, 1e-9), 1)})

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._close(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written like every other output: a temporary file in the checkpoint's own
    folder, fsync, rename. Lightning's own atomic save writes the temporary file under $TMPDIR;
    on another file system the rename fails and it falls back to copying over the old file,
    which an interruption or a full disk leaves torn."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buf = io.BytesIO()  # serialised first: torch's zip writer turns a failing write into a RuntimeError
        torch.save(checkpoint, buf)
        with atomic_write(path, "wb") as f:
            f.write(buf.getbuffer())


class HistoryCSVLogger(CSVLogger):
    """CSVLogger that continues ``metrics.csv`` when a run resumes (Lightning's deletes it):
    rows up to the resumed epoch are kept, later ones (logged after that checkpoint) dropped."""

    def __init__(self, *args, keep_until_epoch: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_until_epoch = keep_until_epoch

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            kept: list[dict] = []
            if self.keep_until_epoch >= 0 and path.is_file():
                with open(path, newline="") as f:
                    kept = [r for r in csv.DictReader(f) if _epoch(r) <= self.keep_until_epoch]
            writer = super().experiment  # deletes the old file
            if kept:
                writer.metrics_keys = sorted({k for r in kept for k in r})
                with atomic_write(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=writer.metrics_keys)
                    w.writeheader()
                    w.writerows(kept)
            return writer
        return self._experiment


def _epoch(row: dict) -> int:
    try:
        return int(float(row.get("epoch") or -1))
    except ValueError:
        return -1


def newest_readable(paths: list[Path]) -> tuple[Path | None, int, list[str]]:
    """The checkpoint with the most training in it among ``paths`` that can be read, its epoch
    (-1 when none), and what was wrong with the others (a torn or empty file)."""
    best, best_key, problems = None, (-1, -1), []
    for p in paths:
        if not p.is_file():
            continue
        try:
            ckpt = read_checkpoint(p)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is skipped and reported
            problems.append(f"{path_text(p)}: {exc}")
            continue
        key = (int(ckpt.get("epoch", -1)), int(ckpt.get("global_step", -1)))
        if best is None or key > best_key:
            best, best_key = p, key
    return best, best_key[0], problems


def build_model(cfg: Config) -> CrackClassifier:
    m, t = cfg.model, cfg.train
    return CrackClassifier(
        backbone=m.backbone, pretrained=m.pretrained, weights_file=m.weights_file, drop_rate=m.drop_rate,
        image_size=m.image_size, class_names=list(cfg.data.class_names), lr=t.frozen.lr,
        weight_decay=t.frozen.weight_decay, label_smoothing=t.label_smoothing, threshold_rule=t.threshold_rule,
        target_fpr=t.target_fpr, head_hidden=m.head_hidden,
    )


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def feature_device(cfg: Config) -> torch.device:
    """Where to run the frozen backbone for the feature cache: this process's GPU if training uses one."""
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def feature_extractor(model: CrackClassifier, engine: str = "auto", device: torch.device | str = "cpu"):
    """The frozen backbone as a function of image batches (uint8 or normalised), on the engine
    :mod:`crack_lightning.engine` picks; the features come back as float32 on the CPU."""
    from .engine import onnx_runner, torch_runner, use_onnx

    model.eval()
    pre = model.pre
    if use_onnx(engine, device):
        ort = onnx_runner(model.backbone, pre.size)
        return lambda x: ort(pre.model_input(x))
    run = torch_runner(copy.deepcopy(model.backbone), device)
    return lambda x: run(pre.model_input(x.to(device, non_blocking=True))).cpu()


def make_trainer(cfg: Config, run_dir: Path, stage: str | None, epochs: int = 1, patience: int = 3,
                 keep_until_epoch: int = -1) -> L.Trainer:
    """A Trainer with every ``trainer.*`` argument of the config, plus what the recipe owns: its
    checkpoints, early stopping, history logger (beside any ``trainer.logger`` given), atomic
    checkpoint writes, and this stage's epochs."""
    kwargs = trainer_kwargs(cfg)
    given = kwargs.pop("logger", None)  # None/True/False: Lightning's default or none; the recipe's stays
    extra = [given] if isinstance(given, Logger) else list(given) if isinstance(given, (list, tuple)) else []
    callbacks: list[Any] = [ProgressBar()] if kwargs.get("enable_progress_bar", True) is not False else []
    logger: Any = False
    if stage:
        ckpt_dir = run_dir / "checkpoints" / stage
        mode = "min" if cfg.train.monitor == "val_loss" else "max"
        callbacks += [
            EpochTimer(),
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.train.monitor, mode=mode, save_last=True,
                            save_top_k=1, enable_version_counter=False),
            EarlyStopping(monitor=cfg.train.monitor, mode=mode, patience=patience),
            InterruptNotice(run_dir),
        ]
        logger = [HistoryCSVLogger(run_dir, name="logs", version=stage, keep_until_epoch=keep_until_epoch), *extra]
    kwargs.update(plugins=[AtomicCheckpointIO()], max_epochs=epochs, callbacks=callbacks, logger=logger,
                  default_root_dir=str(run_dir))
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError) as exc:
        from .engine import no_gpu_hint

        raise ConfigError(f"trainer: {exc}{no_gpu_hint(str(kwargs.get('accelerator')), '--trainer.accelerator')}") \
            from None


def evaluate(cfg: Config, model: CrackClassifier, dm: CrackDataModule, run_dir: Path) -> dict[str, dict]:
    """Validation and test metrics of ``model`` as it is now, on what the DataModule serves (cached
    features while the backbone is frozen and cached, images otherwise)."""
    trainer = make_trainer(cfg, run_dir, None)
    out = {}
    for split in ("val", "test"):
        if not dm.split(split):
            continue
        loader = getattr(dm, f"{split}_dataloader")()
        if split == "val":
            trainer.validate(model, loader, verbose=False)
        else:
            trainer.test(model, loader, verbose=False)
        out[split] = model.last_results[split]["metrics"]
    return out


def _load_weights(model: CrackClassifier, ckpt_path: str | Path) -> None:
    model.load_state_dict(read_checkpoint(ckpt_path)["state_dict"])


def run_stage(cfg: Config, model: CrackClassifier, dm: CrackDataModule, run_dir: Path, stage: str,
              resume: bool, epoch_budget: int | None = None) -> dict:
    """Fit one stage for at most its own epochs and ``epoch_budget`` (what ``trainer.max_epochs``
    leaves of the run); return where its best checkpoint is. Skips a stage already finished."""
    sc = getattr(cfg.train, stage)
    done = run_dir / "checkpoints" / stage / "done.json"
    if resume and done.is_file():
        import json

        info = json.loads(done.read_text())
        _load_weights(model, info["best"])
        return info
    model.freeze_backbone(stage == "frozen")
    model.lr, model.weight_decay = sc.lr, sc.weight_decay
    model.hparams.update(lr=sc.lr, weight_decay=sc.weight_decay)  # each stage's checkpoints say what trained them
    epochs = sc.epochs if epoch_budget is None else min(sc.epochs, epoch_budget)
    folder = run_dir / "checkpoints" / stage
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
    best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
    if best:
        _load_weights(model, best)
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
    """Run the whole recipe; return the metrics written to ``metrics.json``."""
    start = time.time()
    quiet_lightning()
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
            print(f"run folder: {path_text(run_dir)}")
        return _train(cfg, run_dir, resume, start)
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

    before = evaluate(cfg, model, dm, run_dir)
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


def started_from(cfg: Config, model: CrackClassifier) -> dict[str, torch.Tensor] | None:
    """The whole crack classifier in ``model.weights_file`` when the run started from one (e.g. the
    released model), head included; ``None`` for other weights files (ImageNet backbones).

    It is the better partner for ``train.interpolate`` than the frozen stage's result: its head
    knows its own domain, and the average keeps it (field fold, docs/field.md: Mendeley validation
    accuracy 0.998 against 0.984 with the frozen-stage head)."""
    if not cfg.model.weights_file:
        return None
    try:
        sd = read_checkpoint(cfg.model.weights_file)["state_dict"]
    except CheckpointError:
        return None
    own = model.state_dict()
    if sd.keys() != own.keys() or any(sd[k].shape != own[k].shape for k in own):
        return None
    return float_weights(sd)


def finish(cfg: Config, model: CrackClassifier, dm: CrackDataModule, run_dir: Path, result: dict) -> dict:
    """The end of every run: evaluate the final weights (validation chooses the threshold), write
    ``test_predictions.csv`` and the release ``model.pt``; ``result`` gains the split's ``counts``, ``after``
    and ``threshold``."""
    # with a frozen backbone the cached features ARE the backbone's output on the eval-transformed
    # images (same decode, same transform), so testing on them is exact and 10x faster on a CPU
    after = evaluate(cfg, model, dm, run_dir)
    counts = {s: {cfg.data.class_names[k]: v for k, v in c.items()} for s, c in class_counts(dm.records).items()}
    result.update(counts=counts, after=after, threshold=float(model.threshold))
    if is_global_zero():
        if "test" in after:
            write_predictions(run_dir / "test_predictions.csv", dm.split("test"), model.last_results["test"],
                              cfg.data.class_names)
        save_release(model, run_dir / "model.pt", metrics={"test": after.get("test"), "val": after.get("val")},
                     anchors=site_anchors(cfg, model, dm))
    return result


def site_anchors(cfg: Config, model: CrackClassifier, dm: CrackDataModule) -> dict | None:
    """The features of up to :data:`~crack_lightning.calibrate.ANCHORS` training tiles (every source and
    class alike) under the final weights: what ``predict.py --calibrate-site`` refits the head against."""
    from .calibrate import linear_head, pack_anchors, pick_anchors
    from .data import compute_features

    records = pick_anchors(dm.split("train"))
    if linear_head(model) is None or not records:
        return None
    extract = feature_extractor(model, cfg.train.feature_engine, feature_device(cfg))
    items = compute_features(extract, dm.eval_loader("train", records=records), "features of the training anchors")
    return pack_anchors(items.features, items.labels)

