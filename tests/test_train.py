"""End-to-end training through ``train.py``, as a user runs it (tiny settings)."""
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_folder, run_cli, run_main

from crack_lightning.data.records import read_split_csv
from crack_lightning.data.split import check_no_leak

TINY = ["--model.pretrained", "none", "--model.image_size", "32", "--data.num_workers", "0",
        "--data.batch_size", "8", "--trainer.enable_progress_bar", "false", "--data.val_fraction", "0.25",
        "--data.test_fraction", "0.25"]


def test_quickstart_run_writes_everything(trained_run):
    for name in ("config.yaml", "split.csv", "metrics.json", "model_summary.txt", "test_predictions.csv",
                 "model.pt", "checkpoints/frozen/best.ckpt", "checkpoints/frozen/last.ckpt", "logs/frozen/metrics.csv"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    before, after = metrics["before"]["test"], metrics["after"]["test"]
    assert after["n"] == before["n"] == 40
    assert after["acc"] >= 0.85 and after["acc"] > before["acc"]
    assert 0.0 < metrics["threshold"] < 1.0
    records = read_split_csv(trained_run / "split.csv")
    check_no_leak(records)
    with open(trained_run / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(r.split == "test" for r in records) == 40
    assert sum(int(r["correct"]) for r in rows) == round(after["acc"] * 40)
    assert "EfficientNet" in (trained_run / "model_summary.txt").read_text()
    assert "image_size: 128" in (trained_run / "config.yaml").read_text()


def test_frozen_then_finetune_changes_backbone(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=8)
    res = run_main("train.py", "--config", "configs/quickstart.yaml", "--data.root", str(data), "--output_dir",
                   str(tmp_path / "runs"), "--run_name", "two", "--train.frozen.epochs", "2",
                   "--train.finetune.epochs", "2", "--trainer.max_epochs", "3", "--train.cache_features", "false",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                   "--trainer.logger.save_dir", str(tmp_path / "extra"), *TINY)
    assert res.returncode == 0, res.stderr[-2000:]
    # a Trainer argument of the user's reaches Lightning: their logger writes beside the run's history
    assert list((tmp_path / "extra").rglob("metrics.csv")) and (tmp_path / "runs/two/logs/frozen/metrics.csv").is_file()
    # what the user reads: the run folder, the split, the result; no library banners or warnings
    out = res.stdout + res.stderr
    for chatter in ("Tip:", "GPU available", "TPU available", "was configured so", "Warning", "warn", "eval mode",
                    "LeafSpec", "log_every_n_steps"):
        assert chatter not in out, chatter
    assert "run folder: " in res.stdout and "split: train 8 (4 Negative / 4 Positive)" in res.stdout
    assert res.stdout.count("test accuracy") == 1
    run = tmp_path / "runs" / "two"
    frozen_ckpt = torch.load(run / "checkpoints/frozen/best.ckpt", weights_only=True)
    tuned_ckpt = torch.load(run / "checkpoints/finetune/best.ckpt", weights_only=True)
    from crack_lightning.config.files import load_config

    stages = load_config(ROOT / "configs/quickstart.yaml").train
    assert stages.frozen.lr != stages.finetune.lr
    assert frozen_ckpt["hyper_parameters"]["lr"] == stages.frozen.lr  # each stage's own learning rate
    assert tuned_ckpt["hyper_parameters"]["lr"] == stages.finetune.lr
    frozen, tuned = frozen_ckpt["state_dict"], tuned_ckpt["state_dict"]
    key = "backbone.conv_stem.weight"
    assert not torch.equal(frozen[key], tuned[key])
    metrics = json.loads((run / "metrics.json").read_text())
    stages = metrics["stages"]
    assert set(stages) == {"frozen", "finetune"}
    # trainer.max_epochs means Lightning's: the most epochs of the run, both stages together (2 + 1)
    assert (stages["frozen"]["epochs_run"], stages["finetune"]["epochs_run"]) == (2, 1)
    n_train = sum(metrics["counts"]["train"].values())
    for stage in stages.values():  # every epoch timed, over every training image
        assert [e["images"] for e in stage["epoch_times"]] == [n_train] * stage["epochs_run"]
        assert all(e["train_s"] > 0 and e["images_per_s"] > 0 for e in stage["epoch_times"])


def test_interpolate_averages_the_fine_tuned_weights_with_where_fine_tuning_started(tmp_path, trained_run):
    """train.interpolate 0.5 (WiSE-FT): the released weights are the mean of where fine-tuning
    started and the fine-tuned best, and the threshold is chosen again on them. Where it started:
    the frozen stage's best (ImageNet or random start), or the whole classifier the run started from."""
    data = make_folder(tmp_path / "data", n_per_class=8)
    res = run_main("train.py", "--config", "configs/quickstart.yaml", "--data.root", str(data), "--output_dir",
                  str(tmp_path / "runs"), "--run_name", "wise", "--train.frozen.epochs", "1",
                  "--train.finetune.epochs", "1", "--train.interpolate", "0.5", *TINY)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "wise"
    start = torch.load(run / "checkpoints/frozen/best.ckpt", weights_only=True)["state_dict"]
    tuned = torch.load(run / "checkpoints/finetune/best.ckpt", weights_only=True)["state_dict"]
    released = torch.load(run / "model.pt", weights_only=True)
    key = "backbone.conv_stem.weight"
    assert not torch.equal(start[key], tuned[key])
    for k in (key, "backbone.bn1.running_mean", "head.1.weight"):
        assert torch.allclose(released["state_dict"][k].float(), (start[k] + tuned[k]) / 2, atol=2e-3), k
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["interpolate"] == 0.5
    assert metrics["after"]["val"]["threshold"] == metrics["threshold"] == pytest.approx(released["threshold"])
    from crack_lightning.config.files import load_config

    assert load_config(run / "config.yaml").train.interpolate == 0.5  # written with the run
    res = run_main("train.py", "--config", "configs/quickstart.yaml", "--data.root", str(data), "--output_dir",
                  str(tmp_path / "runs"), "--run_name", "wise2", "--train.frozen.epochs", "1",
                  "--train.finetune.epochs", "1", "--train.interpolate", "0.5", *TINY,
                  "--model.weights_file", str(trained_run / "model.pt"))
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "wise2"
    start = torch.load(trained_run / "model.pt", weights_only=True)["state_dict"]  # its head too
    frozen = torch.load(run / "checkpoints/frozen/best.ckpt", weights_only=True)["state_dict"]
    tuned = torch.load(run / "checkpoints/finetune/best.ckpt", weights_only=True)["state_dict"]
    released = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert not torch.allclose(start["head.1.weight"].float(), frozen["head.1.weight"], atol=1e-2)
    for k in (key, "head.1.weight"):
        assert torch.allclose(released[k].float(), (start[k].float() + tuned[k]) / 2, atol=2e-3), k
    bad = run_main("train.py", "--config", "configs/quickstart.yaml", "--train.interpolate", "1.5")
    assert bad.returncode == 2 and "train.interpolate: must be in [0, 1]" in bad.stderr


def test_every_trainer_argument_reaches_the_trainer(tmp_path):
    """trainer.* is lightning.Trainer's own signature: clipping, accumulation and the rest arrive as
    given; the recipe keeps its callbacks, checkpoint I/O and history logger; a wrong one is named."""
    from crack_lightning.config.files import load_config
    from crack_lightning.errors import ConfigError
    from crack_lightning.training.callbacks import AtomicCheckpointIO, HistoryCSVLogger
    from crack_lightning.training.trainer import make_trainer

    cfg = load_config(ROOT / "configs/quickstart.yaml", [
        ("trainer.gradient_clip_val", "0.5"), ("trainer.gradient_clip_algorithm", "value"),
        ("trainer.accumulate_grad_batches", "3"), ("trainer.check_val_every_n_epoch", "2"),
        ("trainer.accelerator", "cpu"), ("trainer.enable_progress_bar", "false")])
    t = make_trainer(cfg, tmp_path, "frozen", epochs=4)
    assert (t.gradient_clip_val, t.gradient_clip_algorithm, t.accumulate_grad_batches) == (0.5, "value", 3)
    assert t.check_val_every_n_epoch == 2 and t.max_epochs == 4
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(lg, HistoryCSVLogger) for lg in t.loggers)
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer\.gradient_clip_vall'"):
        load_config(None, [("trainer.gradient_clip_vall", "1")])
    with pytest.raises(ConfigError, match=r"trainer\.accumulate_grad_batches: expected int, got 'many'"):
        load_config(None, [("trainer.accumulate_grad_batches", "many")])
    with pytest.raises(ConfigError, match=r"trainer\.callbacks is set by the recipe"):
        load_config(None, [("trainer.callbacks", "[]")])
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs: must be >= 0"):
        load_config(None, [("trainer.max_epochs", "-2")])


@pytest.mark.ddp
def test_ddp_two_processes_on_cpu(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=8)
    res = run_cli("train.py", "--config", "configs/quickstart.yaml", "--data.root", str(data), "--output_dir",
                  str(tmp_path / "runs"), "--run_name", "ddp", "--train.frozen.epochs", "1",
                  "--train.finetune.epochs", "1", "--train.cache_features", "true",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("test accuracy") == 1  # once, not once per process
    # the scan and the feature cache ran once, in rank 0; the second process read them
    assert res.stderr.count("scanning images:   0%") == 1, res.stderr[-3000:]
    assert res.stderr.count("caching features (train):   0%") == 1
    assert not (tmp_path / "runs" / "ddp" / "features.pt").exists()  # removed once the run ended
    assert "sync_dist" not in res.stderr and "DistributedSampler" not in res.stderr
    metrics = json.loads((tmp_path / "runs" / "ddp" / "metrics.json").read_text())
    assert metrics["stages"]["frozen"]["world_size"] == 2
    assert metrics["stages"]["finetune"]["world_size"] == 2
    # gathered from both processes, each test image counted exactly once
    assert metrics["after"]["test"]["n"] == 4
    assert len((tmp_path / "runs" / "ddp" / "test_predictions.csv").read_text().splitlines()) == 5


def test_weights_unavailable_stops_with_one_line(tmp_path):
    res = run_cli("train.py", "--config", "configs/base.yaml", "--data.root", str(ROOT / "data/sample"),
                  "--output_dir", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2
    assert res.stderr.startswith("error: could not download ImageNet weights for mobilenetv3_large_100")
    assert "Traceback" not in res.stderr


def test_augmented_feature_views_multiply_training_set(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=8)
    res = run_main("train.py", "--config", "configs/robust.yaml", "--data.root", str(data), "--output_dir",
                   str(tmp_path / "runs"), "--run_name", "views", "--train.frozen.epochs", "2",
                   "--train.feature_views", "2", *TINY)
    assert res.returncode == 0, res.stderr[-2000:]
    last = torch.load(tmp_path / "runs/views/checkpoints/frozen/last.ckpt", weights_only=True)
    # 8 training images (16 * 0.5), clean + 2 augmented views = 24 feature rows, batch 8 -> 3 steps per epoch
    assert last["global_step"] == 2 * 3
    metrics = json.loads((tmp_path / "runs/views/metrics.json").read_text())
    assert metrics["after"]["test"]["n"] == 4


def test_gpu_loaders_drive_training_and_feature_caching(tmp_path):
    """What a GPU run feeds the model (uint8 (B,H,W,3), eval resize left to the model) goes
    through the real Lightning fit/test and the feature cache, here on the CPU; the cached
    features equal those of the CPU loaders."""
    import lightning as L

    from crack_lightning.config.schema import DataConfig
    from crack_lightning.data.datamodule import CrackDataModule
    from crack_lightning.data.loaders import compute_features
    from crack_lightning.data.scan import scan
    from crack_lightning.data.split import split_records
    from crack_lightning.models.classifier import CrackClassifier
    from crack_lightning.training.callbacks import EvaluationResults
    from crack_lightning.training.features import feature_extractor

    records = split_records(scan(make_folder(tmp_path / "d", n_per_class=8), ("Negative", "Positive"))[0],
                            0.25, 0.25, 0)
    torch.manual_seed(0)
    model = CrackClassifier(pretrained="none", image_size=48)
    cfg = DataConfig(batch_size=4, num_workers=0)
    gpu_dm = CrackDataModule(cfg, records, model.pre, device_normalize=True, defer_resize=True)
    cpu_dm = CrackDataModule(cfg, records, model.pre)
    assert next(iter(gpu_dm.val_dataloader()))[0].shape == (4, 64, 64, 3)  # files travel at 64 px
    assert next(iter(gpu_dm.train_dataloader()))[0].shape == (4, 48, 48, 3)  # augmented to 48 in the worker
    extract = feature_extractor(model, "torch", "cpu")
    on_gpu_path = compute_features(extract, gpu_dm.eval_loader("val"), "val")
    on_cpu_path = compute_features(extract, cpu_dm.eval_loader("val"), "val")
    assert torch.allclose(on_gpu_path.features, on_cpu_path.features, atol=1e-5)
    assert torch.equal(on_gpu_path.labels, on_cpu_path.labels)
    before = model.head[1].weight.detach().clone()
    found = EvaluationResults()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[found])
    trainer.fit(model, gpu_dm)
    assert not torch.equal(before, model.head[1].weight)
    trainer.test(model, gpu_dm, verbose=False)
    on_gpu_path = found.results["test"]
    trainer.test(model, cpu_dm, verbose=False)
    assert sorted(on_gpu_path["index"].tolist()) == list(range(len(gpu_dm.split("test"))))
    assert torch.allclose(on_gpu_path["probs"], found.results["test"]["probs"], atol=1e-5)


def test_crash_before_first_checkpoint_leaves_no_run_folder(tmp_path, monkeypatch):
    """A run that dies on a bug before it has trained anything leaves nothing that blocks re-running it."""
    import pytest

    from crack_lightning.config.files import load_config
    from crack_lightning.training import recipe as training
    from crack_lightning.training.run_folder import RUN_NAME_ENV

    data = make_folder(tmp_path / "data", n_per_class=4)
    pairs = [("data.root", str(data)), ("output_dir", str(tmp_path / "runs")), ("run_name", "r"),
             ("model.pretrained", "none"), ("model.image_size", "32"), ("data.num_workers", "0"),
             ("train.frozen.epochs", "1"), ("trainer.enable_progress_bar", "false")]
    cfg = load_config(ROOT / "configs/quickstart.yaml", pairs)

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    run_stage = training.run_stage
    monkeypatch.setenv(RUN_NAME_ENV, "r")  # train() records the name there for DDP processes
    monkeypatch.setattr(training, "run_stage", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        training.train(cfg)
    assert not (tmp_path / "runs" / "r").exists()
    monkeypatch.setattr(training, "run_stage", run_stage)
    result = training.train(cfg)  # same name, no --resume needed
    assert (tmp_path / "runs" / "r" / "model.pt").is_file() and result["after"]["test"]["n"] > 0


def test_fpr_threshold_rule_and_val_f1_monitor_end_to_end(tmp_path):
    """threshold_rule fpr: the stored threshold is the lowest whose validation false-positive rate is
    within budget; monitor val_f1: the best checkpoint is the epoch of the highest val_f1 (mode max)."""
    import csv as _csv

    from conftest import run_main

    from crack_lightning.inference.predictor import Predictor
    from crack_lightning.models.metrics import binary_metrics

    data = make_folder(tmp_path / "data", n_per_class=12)
    res = run_main("train.py", "--config", "configs/quickstart.yaml", "--data.root", data, "--output_dir",
                   tmp_path / "runs", "--run_name", "f", "--train.frozen.epochs", "4", "--train.frozen.patience", "10",
                   "--train.threshold_rule", "fpr", "--train.target_fpr", "0.0", "--train.monitor", "val_f1",
                   "--train.cache_features", "false", *TINY)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "f"
    with open(run / "logs/frozen/metrics.csv") as f:
        f1s = [(int(float(r["epoch"])), float(r["val_f1"])) for r in _csv.DictReader(f) if r.get("val_f1")]
    best = json.loads((run / "checkpoints/frozen/done.json").read_text())
    assert best["best_score"] == pytest.approx(max(v for _, v in f1s), abs=1e-6)
    val = [r for r in read_split_csv(run / "split.csv") if r.split == "val"]
    p = Predictor(run / "model.pt", engine="torch", num_workers=0)
    probs = torch.tensor([r.probability for r in p.iter_rows([Path(r.path) for r in val], progress=False)])
    labels = torch.tensor([float(r.label) for r in val])
    thr = p.threshold
    assert binary_metrics(probs, labels, thr)["fp"] == 0  # within the budget of 0 false positives
    lower = probs[probs < thr - 1e-6]
    if len(lower):  # any lower threshold (the next score down) would break the budget
        assert binary_metrics(probs, labels, float(lower.max()))["fp"] > 0


def test_quieting_lightning_is_undone_after_the_run():
    """The recipe hides Lightning's banners and known warnings while it runs; a library caller's own
    warning filters and loggers are as they were afterwards."""
    import logging
    import warnings

    from crack_lightning.console import quiet_lightning

    before = list(warnings.filters)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with quiet_lightning():
        assert len(warnings.filters) > len(before) and logger.filters
    assert warnings.filters == before and not logger.filters
