"""A run's folder: its name (the same in every DDP process), one run at a time in it, and what may be
resumed from it."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from crack_lightning.config.schema import Config
from crack_lightning.errors import ConfigError
from crack_lightning.files import path_text
from crack_lightning.models.checkpoint import read_checkpoint

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
    if not started and run_dir.is_dir() and any(p.name not in RUN_FILES for p in run_dir.iterdir()):
        raise ConfigError(f"{path_text(run_dir)} exists and is not a run (it holds other files): refusing to write "
                          "into it; choose another --run_name or output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to the output folder {run_dir}: {exc.strerror or exc}") from exc


LOCK_NAME = ".lock"  # the kernel lock (filelock): released by the kernel when its process dies, even by kill -9
HOLDER_NAME = ".lock.json"  # who holds it (host, process, start), for the message another run prints
RUN_FILES = {LOCK_NAME, HOLDER_NAME}  # what a folder may hold before a run has written anything


class RunLock:
    """One run per folder at a time: a kernel file lock on ``run_dir/.lock`` (``filelock``), so a
    run that dies in any way leaves no stale lock; ``.lock.json`` names the holder."""

    def __init__(self, run_dir: Path):
        import filelock

        self.path, self.holder = run_dir / LOCK_NAME, run_dir / HOLDER_NAME
        self._lock = filelock.FileLock(self.path, timeout=0)
        self.held = False

    def acquire(self) -> None:
        import json
        import socket

        import filelock

        try:
            self._lock.acquire()
        except filelock.Timeout:
            try:
                holder = json.loads(self.holder.read_text())
            except (OSError, ValueError):
                holder = {}
            raise ConfigError(f"{path_text(self.path.parent)} is in use by another run (process "
                              f"{holder.get('pid', '?')} on {holder.get('host', '?')} since "
                              f"{holder.get('since', '?')}); wait for it or choose another --run_name") from None
        self.held = True
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": dt.datetime.now().isoformat(timespec="seconds")}
        self.holder.write_text(json.dumps(me))

    def release(self) -> None:
        if self.held:
            self.holder.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)  # while still held: no other run can be holding this file
            self._lock.release()
            self.held = False


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


def read_done(path: Path) -> dict:
    """A finished stage's ``done.json``, its ``best`` checkpoint relative to the run folder. Runs written
    before paths were stored relative name their own folder's file by an absolute path: the file of
    that name in this stage's folder is the one meant (a moved or copied run keeps to itself)."""
    import json

    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        best = Path(info["best"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path_text(path)} is damaged ({exc.__class__.__name__}): delete it to train the "
                          "stage again from its last checkpoint") from None
    run_dir = path.parent.parent.parent
    local = best if not best.is_absolute() else path.parent.relative_to(run_dir) / best.name
    if ".." in local.parts or not (run_dir / local).is_file():
        raise ConfigError(f"{path_text(path)} names a checkpoint that is not in this run folder ({best}): delete "
                          "it to train the stage again from its last checkpoint")
    info["best"] = local.as_posix()
    return info


# what --resume may change: how fast and how long it trains, never what it trains on or what it builds
RESUMABLE = {"data.num_workers", "data.prefetch_factor", "data.batch_size", "output_dir", "run_name",
             "train.frozen.epochs", "train.frozen.patience", "train.finetune.epochs", "train.finetune.patience"}


def check_resume(cfg: Config, run_dir: Path) -> None:
    """``--resume`` continues the run that is there: every key that shapes the model, the data or the
    split must be what the run was started with (its ``config.yaml``); the differing keys are named,
    before any file is touched."""
    from crack_lightning.config.files import to_dict
    from crack_lightning.config.reader import load_yaml

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    stored = flat({k: v for k, v in load_yaml(run_dir / "config.yaml").items() if k != "trainer"})
    now = flat({k: v for k, v in to_dict(cfg).items() if k != "trainer"})
    changed = [k for k in now if k in stored and k not in RESUMABLE and stored[k] != now[k]]
    if changed:
        shown = ", ".join(f"{k} ({stored[k]!r} -> {now[k]!r})" for k in changed[:6])
        raise ConfigError(f"--resume: {path_text(run_dir)} was trained with other settings: {shown}. Resuming "
                          "would mix two different runs: resume with the run's own config.yaml (only epochs, "
                          "patience, batch size, workers and trainer.* may change), or start a new --run_name")
