import os
import pickle

import pytest
import torch

from crack_lightning.errors import CheckpointError
from crack_lightning.models.checkpoint import load_model, read_checkpoint, save_release
from crack_lightning.models.classifier import CrackClassifier


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/crack_lightning_pwned",))


def test_release_roundtrip_keeps_outputs_and_threshold(tmp_path):
    torch.manual_seed(0)
    m = CrackClassifier(pretrained="none", image_size=64).eval()
    m.threshold.fill_(0.42)
    save_release(m, tmp_path / "m.pt", metrics={"test": {"acc": 1.0}}, half=False)
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), m(x), atol=1e-6)
    assert float(loaded.threshold) == pytest.approx(0.42)
    assert loaded.pre == m.pre
    assert oct((tmp_path / "m.pt").stat().st_mode & 0o777) != oct(0o600)


def test_half_precision_release_is_small_and_close(tmp_path):
    torch.manual_seed(0)
    m = CrackClassifier(pretrained="none", image_size=64).eval()
    save_release(m, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").stat().st_size < 8_000_000
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(load_model(tmp_path / "m.pt")(x)), torch.sigmoid(m(x)), atol=2e-2)


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": Payload()}, path)
    if os.path.exists("/tmp/crack_lightning_pwned"):
        os.remove("/tmp/crack_lightning_pwned")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(path)
    assert not os.path.exists("/tmp/crack_lightning_pwned")


def test_damaged_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "none.pt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch file"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a crack_lightning checkpoint"):
        load_model(other)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError):
        load_model(plain)


def test_other_architecture_is_refused(tmp_path):
    m = CrackClassifier(pretrained="none", image_size=64)
    save_release(m, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    obj["hyper_parameters"]["backbone"] = "mobilenetv3_small_050"
    torch.save(obj, tmp_path / "swapped.pt")
    with pytest.raises(CheckpointError, match="does not match architecture mobilenetv3_small_050"):
        load_model(tmp_path / "swapped.pt")


def test_release_file_loads_with_load_from_checkpoint_offline():
    """The shipped release is a checkpoint Lightning users load the usual way, with no network and
    no weights file; weights_only-safe (torch.load's default in Lightning for this file)."""
    from conftest import ROOT

    from crack_lightning import CrackClassifier

    path = ROOT / "models" / "crack_lite0.pt"
    m = CrackClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    ref = load_model(path)
    assert m.hparams.backbone == "tf_efficientnet_lite0" and m.hparams.pretrained == "none"
    assert float(m.threshold) == pytest.approx(float(ref.threshold)) == pytest.approx(0.6343, abs=1e-4)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(m(x), ref(x), atol=1e-5)
    assert read_checkpoint(path)["preprocessing"] == {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}


def test_stored_preprocessing_wins_over_timms_current_config(tmp_path, monkeypatch):
    """A timm upgrade that changed the architecture's default mean/std or size must not change what
    a trained model sees: both loaders use the preprocessing stored in the file."""
    import timm.data

    torch.manual_seed(0)
    m = CrackClassifier(pretrained="none", image_size=64)
    save_release(m, tmp_path / "m.pt", half=False)
    trainer_ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                    "pytorch-lightning_version": "2.6.6"}
    m.on_save_checkpoint(trainer_ckpt)
    torch.save(trainer_ckpt, tmp_path / "m.ckpt")
    real = timm.data.resolve_data_config
    monkeypatch.setattr(timm.data, "resolve_data_config",
                        lambda *a, **k: {**real(*a, **k), "mean": (0.1, 0.2, 0.3), "std": (0.9, 0.9, 0.9)})
    assert CrackClassifier(pretrained="none", image_size=64).pre.mean == (0.1, 0.2, 0.3)  # the "upgrade"
    assert load_model(tmp_path / "m.pt").pre == m.pre
    assert CrackClassifier.load_from_checkpoint(tmp_path / "m.ckpt", map_location="cpu").pre == m.pre


@pytest.mark.parametrize("name,threshold", [("crack_lite0.pt", 0.6343), ("crack_lite0_field.pt", 0.4487)])
def test_released_models_on_the_bundled_sample(name, threshold):
    """Both releases (the default and the field model), as predict.py runs them, on data/sample (200
    Mendeley patches; some may have been in their training split, so this guards the files and the
    pipeline, not generalisation). The field model loads offline the Lightning way too."""
    from conftest import ROOT, SAMPLE

    from crack_lightning import CrackClassifier
    from crack_lightning.inference.predictor import Predictor, compare

    m = CrackClassifier.load_from_checkpoint(ROOT / "models" / name, map_location="cpu")
    assert m.hparams.pretrained == "none" and float(m.threshold) == pytest.approx(threshold, abs=1e-4)
    p = Predictor(ROOT / "models" / name, num_workers=0)
    rows = list(p.iter_rows(sorted(SAMPLE.rglob("*.jpg")), progress=False))
    m = compare(rows, p.class_names, p.threshold)
    assert m["n"] == 200 and m["acc"] >= 0.99
