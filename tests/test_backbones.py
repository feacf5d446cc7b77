"""Every backbone family a user is likely to name trains, saves, reloads and predicts.

timm's random initialisation, tiny images: what is checked is the plumbing (the head's
width, checkpoints, the release file, ONNX export), not accuracy.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, make_folder, run_cli, run_main
from lightning.pytorch.callbacks import ModelCheckpoint

from crack_lightning.config.schema import DataConfig
from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.scan import scan
from crack_lightning.data.split import split_records
from crack_lightning.inference.predictor import Predictor
from crack_lightning.models.checkpoint import load_model, save_release
from crack_lightning.models.classifier import CrackClassifier

FAMILIES = ["mobilenetv3_large_100", "tf_efficientnet_lite0", "resnet18", "convnext_atto"]


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("bb") / "data", n_per_class=4, size=40)
    return split_records(scan(root, ("Negative", "Positive"))[0], 0.25, 0.25, 0)


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_trains_saves_reloads_predicts(arch, tiny_records, tmp_path):
    torch.manual_seed(0)
    model = CrackClassifier(backbone=arch, pretrained="none", image_size=32)
    with torch.no_grad():  # the head is as wide as what the backbone really returns
        assert model.head[1].in_features == model.backbone.eval()(torch.zeros(1, 3, 32, 32)).shape[1]
    dm = CrackDataModule(DataConfig(batch_size=4, num_workers=0), tiny_records, model.pre)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="step", save_last=False)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, accelerator="cpu", logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = model.head[1].weight.detach().clone()
    trainer.fit(model, dm)
    assert trainer.global_step == 1 and not torch.equal(before, model.head[1].weight)

    reloaded = CrackClassifier.load_from_checkpoint(ckpt.best_model_path, map_location="cpu").eval()
    assert reloaded.hparams.backbone == arch and reloaded.hparams.pretrained == "none"
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in reloaded.state_dict().items())

    save_release(model, tmp_path / "model.pt", half=False)
    paths = [Path(r.path) for r in tiny_records]
    expected = load_model(tmp_path / "model.pt")
    predictor = Predictor(tmp_path / "model.pt", num_workers=0)  # ONNX Runtime on the CPU
    rows = list(predictor.iter_rows(paths, progress=False))
    assert [r.path for r in rows] == [str(p) for p in paths] and all(r.error == "" for r in rows)
    batch = torch.stack([dm.eval_loader("train").dataset[0][0]])
    with torch.no_grad():
        assert torch.allclose(predictor.probabilities(batch), expected.predict_proba(batch), atol=1e-4)


def test_weights_file_run_needs_the_file_only_to_start(tmp_path):
    """The design card's command with a local MobileNetV3 weights file: it trains, and once the
    file is gone the run's checkpoints still load and predict (they hold every weight)."""
    import timm

    weights = tmp_path / "mnv3.pth"
    torch.save(timm.create_model("mobilenetv3_large_100").state_dict(), weights)
    data = make_folder(tmp_path / "data", n_per_class=6, size=40)
    res = run_main("train.py", "--config", "configs/base.yaml", "--model.weights_file", str(weights),
                   "--data.root", str(data), "--trainer.max_epochs", "1", "--model.image_size", "32",
                   "--data.num_workers", "0", "--data.batch_size", "8", "--output_dir", str(tmp_path / "runs"),
                   "--run_name", "mnv3", "--trainer.enable_progress_bar", "false")
    assert res.returncode == 0, res.stderr[-3000:]
    weights.unlink()
    run = tmp_path / "runs" / "mnv3"
    ckpt = torch.load(run / "checkpoints/frozen/best.ckpt", weights_only=True)
    assert ckpt["initial_weights"] == {"pretrained": "timm", "weights_file": str(weights)}
    model = CrackClassifier.load_from_checkpoint(run / "checkpoints/frozen/best.ckpt", map_location="cpu")
    assert model.hparams.backbone == "mobilenetv3_large_100"
    out = tmp_path / "preds.csv"
    res = run_main("predict.py", "--checkpoint", str(run / "model.pt"), str(data), "--output", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 1 + 12


def test_hub_out_of_reach_fails_at_once_with_the_flag(tmp_path):
    """Offline, the hub recipe stops before any hub retry, naming the exact flag to use."""
    res = run_cli("train.py", "--config", "configs/base.yaml", "--data.root", str(ROOT / "data/sample"),
                  "--output_dir", str(tmp_path), env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download ImageNet weights for mobilenetv3")
    assert "cannot be reached" in lines[0] and "--model.weights_file PATH" in lines[0]
    assert not any(tmp_path.iterdir())  # no run folder left behind


def test_hub_weights_in_the_local_cache_load_offline(tmp_path, monkeypatch):
    """Weights timm downloaded once load from the local cache when the hub is out of reach."""
    import huggingface_hub.constants as hf
    import timm
    from safetensors.torch import save_file

    from crack_lightning.models.components.pretrained import create_pretrained

    ref = timm.create_model("mobilenetv3_large_100")
    repo = ref.pretrained_cfg["hf_hub_id"]
    snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, snap / "model.safetensors")
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    net = create_pretrained("mobilenetv3_large_100", "timm")
    assert hf.HF_HUB_OFFLINE  # went to the cache without asking the hub
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())
