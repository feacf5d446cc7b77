import torch

from crack_lightning.models.classifier import CrackClassifier
from crack_lightning.tensor_ops import model_input, normalize


def tiny(**kw):
    return CrackClassifier(backbone="tf_efficientnet_lite0", pretrained="none", image_size=64, **kw)


def test_forward_images_and_features_agree():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits = m(x)
        assert logits.shape == (3,)
        assert torch.allclose(m.head_logits(m.features(x)), logits)  # the explicit cached-feature path
    assert m.pre.size == 64 and m.pre.mean == (0.5, 0.5, 0.5)


def test_freeze_keeps_backbone_fixed_and_bn_in_eval():
    m = tiny()
    m.freeze_backbone(True)
    m.train()
    assert not m.backbone.training and m.head.training
    assert all(not p.requires_grad for p in m.backbone.parameters())
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    loss = m._loss(m(torch.randn(4, 3, 64, 64)), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    loss.backward()
    opt.step()
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too
    m.freeze_backbone(False)
    m.train()
    assert m.backbone.training and all(p.requires_grad for p in m.backbone.parameters())


def test_label_smoothing_changes_target():
    """Smoothing s moves the targets to 1 - s/2 and s/2: the loss is BCE against those, exactly."""
    m = tiny(label_smoothing=0.2)
    logits = torch.tensor([10.0, -3.0])
    p = torch.sigmoid(logits)
    targets = torch.tensor([0.9, 0.1])  # labels 1 and 0 with s = 0.2
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert torch.allclose(m._loss(logits, torch.tensor([1.0, 0.0])), expected, atol=1e-4)
    plain = -(torch.tensor([1.0, 0.0]) * p.log() + torch.tensor([0.0, 1.0]) * (1 - p).log()).mean()
    assert torch.allclose(tiny()._loss(logits, torch.tensor([1.0, 0.0])), plain, atol=1e-4)
    assert abs(float(expected) - float(plain)) > 0.1  # and smoothing really changes it


def test_threshold_is_part_of_state_dict():
    m = tiny()
    m.threshold.fill_(0.3)
    m2 = tiny()
    m2.load_state_dict(m.state_dict())
    assert float(m2.threshold) == 0.3


def test_uint8_images_are_normalised_by_the_model():
    """uint8 batches are (B,H,W,3), as loaders ship them; the model normalises them itself."""
    torch.manual_seed(0)
    m = tiny().eval()
    assert m.pre.size == 64
    raw = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(m(raw), m(normalize(m.pre, raw.permute(0, 3, 1, 2))), atol=1e-6)
        assert torch.allclose(m.predict_proba(raw), torch.sigmoid(m(raw)), atol=1e-6)


def test_batches_reach_the_steps_preprocessed_and_features_go_to_the_head_alone():
    """on_after_batch_transfer finishes a uint8 image batch on the module's device (what Lightning
    calls after the copy); a cached-feature batch is explicit (``features``) and only the head runs."""
    from crack_lightning.data.loaders import Batch

    torch.manual_seed(0)
    m = tiny().eval()
    raw = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    y, idx = torch.tensor([0.0, 1.0]), torch.tensor([0, 1])
    done = m.on_after_batch_transfer(Batch(raw, y, idx, []), 0)
    assert done.x.dtype == torch.float32 and done.x.shape == (2, 3, 64, 64)
    assert torch.equal(done.x, model_input(m.pre, raw)) and torch.equal(done.y, y)
    feats = torch.randn(2, m.head[-1].in_features)
    fb = Batch(feats, y, idx, [], features=True)
    assert m.on_after_batch_transfer(fb, 0) is fb
    with torch.no_grad():
        assert torch.allclose(m._logits(fb), m.head(feats).squeeze(1))
        assert torch.allclose(m._logits(done), m(raw), atol=1e-6)


def test_mlp_head_trains_saves_and_reloads(tmp_path):
    """model.head_hidden: a one-hidden-layer head; the release file rebuilds it from its hparams."""
    from crack_lightning.models.checkpoint import load_model, save_release

    torch.manual_seed(0)
    m = tiny(head_hidden=16).eval()
    assert [type(x).__name__ for x in m.head] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert m.head[1].out_features == 16 and m.head[4].in_features == 16
    save_release(m, tmp_path / "m.pt", half=False)
    again = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(again(x), m(x), atol=1e-6)


def test_the_model_is_built_from_its_signature():
    """One list of model arguments (CrackNet's signature): every model.* key reaches the
    constructor, the config supplies every argument, and a checkpoint rebuilds with all of them."""
    import dataclasses

    from crack_lightning.config.schema import Config, ModelConfig
    from crack_lightning.models.checkpoint import check_hparams
    from crack_lightning.models.network import model_arguments
    from crack_lightning.training.recipe import model_kwargs

    names = model_arguments()
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= names
    cfg = Config()
    cfg.train.label_smoothing, cfg.model.head_hidden = 0.1, 7
    kwargs = model_kwargs(cfg)
    assert set(kwargs) == names and kwargs["label_smoothing"] == 0.1 and kwargs["head_hidden"] == 7
    stored = check_hparams({**kwargs, "unknown_key": 1}, "x.ckpt")
    assert set(stored) == names and stored["pretrained"] == "none" and stored["lr"] == cfg.train.frozen.lr
