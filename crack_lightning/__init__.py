"""crack_lightning: is there a crack in this photo of concrete? Train, evaluate, predict, localise, serve.

The public API is imported lazily, so ``import crack_lightning`` (and a command-line
mistake) does not pay for importing torch and Lightning::

    from crack_lightning import CrackClassifier, Predictor
    model = CrackClassifier.load_from_checkpoint("runs/NAME/checkpoints/frozen/best.ckpt")
"""
from __future__ import annotations

__version__ = "0.3.0"

_API = {
    "CrackClassifier": "models.classifier", "CrackDataModule": "data.datamodule", "Predictor": "inference.predictor",
    "load_model": "models.checkpoint", "save_release": "models.checkpoint", "localize": "inference.localize",
    "decode_image": "data.images", "create_app": "serve.app", "load_config": "config.files", "train": "training.recipe",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'crack_lightning' has no attribute {name!r}")
