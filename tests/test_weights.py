import numpy as np
import pytest
import skimage.data as skdata
import torch
from PIL import Image

from crack_lightning.errors import WeightsError
from crack_lightning.models.components.pretrained import (
    create_pretrained,
    lite0_package_file,
)

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_top5(model, array):
    img = Image.fromarray(array).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    x = (x - 0.5) / 0.5  # Lite0 preprocessing: mean = std = 0.5
    with torch.no_grad():
        return model(x[None])[0].topk(5).indices.tolist()


def test_lite0_package_weights_classify_imagenet_images():
    model = create_pretrained("tf_efficientnet_lite0", "lite0").eval()
    cat = imagenet_top5(model, skdata.chelsea())
    coffee = imagenet_top5(model, skdata.coffee())
    assert cat[0] in CATS, cat
    assert coffee[0] == ESPRESSO, coffee


def test_random_init_does_not_classify():
    """Guards the test above: without the converted weights the same check fails."""
    torch.manual_seed(0)
    model = create_pretrained("tf_efficientnet_lite0", "none").eval()
    assert imagenet_top5(model, skdata.coffee())[0] != ESPRESSO


def test_local_weights_file_in_lukemelas_format(tmp_path):
    src = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": src}, path)
    model = create_pretrained("tf_efficientnet_lite0", "timm", weights_file=str(path)).eval()
    assert imagenet_top5(model, skdata.coffee())[0] == ESPRESSO


def test_hub_unreachable_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"could not download ImageNet weights for mobilenetv3_large_100 .*"
                                           r"HF_HUB_OFFLINE is set.*--model\.weights_file PATH.*offline\.yaml"):
        create_pretrained("mobilenetv3_large_100", "timm")


def test_wrong_weights_for_architecture(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_pretrained("mobilenetv3_small_050", "none").state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit"):
        create_pretrained("tf_efficientnet_lite0", "none", weights_file=str(path))


def test_lite0_source_only_for_lite0():
    with pytest.raises(WeightsError, match="only provides weights for tf_efficientnet_lite0"):
        create_pretrained("mobilenetv3_large_100", "lite0")


def test_missing_and_damaged_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_pretrained("tf_efficientnet_lite0", "none", weights_file=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_pretrained("tf_efficientnet_lite0", "none", weights_file=str(bad))


def test_unknown_architecture():
    with pytest.raises(WeightsError, match="unknown timm model 'no_such_net'"):
        create_pretrained("no_such_net", "none")


def test_backbone_from_a_crack_lightning_checkpoint(tmp_path):
    """model.weights_file may be a trained checkpoint (e.g. the release): its backbone starts the new run."""
    from crack_lightning.models.checkpoint import save_release
    from crack_lightning.models.classifier import CrackClassifier

    torch.manual_seed(0)
    trained = CrackClassifier(pretrained="none", image_size=32)
    save_release(trained, tmp_path / "m.pt", half=False)
    fresh = CrackClassifier(pretrained="none", weights_file=str(tmp_path / "m.pt"), image_size=32)
    assert all(torch.equal(v, trained.backbone.state_dict()[k]) for k, v in fresh.backbone.state_dict().items())


def test_interpolate_mixes_float_tensors_and_keeps_counters():
    from crack_lightning.training.wise import interpolate

    start = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(5), "threshold": torch.tensor(0.2)}
    tuned = {"w": torch.tensor([2.0, 4.0, 8.0]), "bn.num_batches_tracked": torch.tensor(9), "threshold": torch.tensor(0.7)}
    mixed = interpolate(start, tuned, 0.25)
    assert torch.allclose(mixed["w"], torch.tensor([0.5, 1.0, 2.0]))
    assert int(mixed["bn.num_batches_tracked"]) == 9 and float(mixed["threshold"]) == pytest.approx(0.7)
    assert torch.equal(interpolate(start, tuned, 1.0)["w"], tuned["w"])
    assert torch.equal(interpolate(start, tuned, 0.0)["w"], start["w"])
    with pytest.raises(WeightsError, match="different architectures"):
        interpolate({"w": torch.zeros(2)}, tuned, 0.5)
    with pytest.raises(ValueError):
        interpolate(start, tuned, 1.5)
