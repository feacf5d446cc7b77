"""Grad-CAM for one patch: which pixels pushed the crack logit up.

Computed on the last convolutional feature map of the backbone
(``forward_features``), the usual Grad-CAM layer for a CNN classifier.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from crack_lightning.data.images import decode_image
from crack_lightning.data.transforms import eval_transform
from crack_lightning.files import PNG_METADATA, atomic_write, path_text
from crack_lightning.models.network import CrackNet


def grad_cam(model: CrackNet, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """Saliency ``(S,S)`` in [0,1] for one preprocessed image ``(1,3,S,S)``, and its crack probability."""
    model.eval()
    with torch.enable_grad():
        feats = model.backbone.forward_features(x.float()).detach().requires_grad_(True)
        logit = model.head(model.backbone.forward_head(feats, pre_logits=True)).squeeze()
        (grad,) = torch.autograd.grad(logit, feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam / cam.max() if float(cam.max()) > 0 else cam
    return cam.detach().numpy(), float(torch.sigmoid(logit.detach()))


def explain_file(model: CrackNet, path: str | Path, out_path: str | Path) -> float:
    """Write ``out_path`` (PNG: the patch and its Grad-CAM overlay); return the probability."""
    image = decode_image(path)
    x = eval_transform(model.pre)(image=image)["image"][None]
    cam, prob = grad_cam(model, x)
    shown = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=cam.shape, mode="bilinear",
        align_corners=False)[0].permute(1, 2, 0).clamp(0, 255).byte())
    names = list(model.hparams.class_names)
    verdict = names[int(prob >= float(model.threshold))]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    axes[0].imshow(shown)
    axes[0].set_title(path_text(Path(path).name), fontsize=9)
    axes[1].imshow(shown)
    im = axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title(f"Grad-CAM: {verdict} (p={prob:.3f})", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02, label="evidence for crack")
    with atomic_write(out_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)
    return prob
