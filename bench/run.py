#!/usr/bin/env python
"""Speed benchmarks on whatever machine runs them; writes results/run/<date-time>_<host>.json and .md.

    python bench/run.py --data ../shared/data/mendeley --run runs/mendeley_lite0_ort

1. data pipeline: images/s for ONE worker (decode + train augmentation, decode + eval preprocessing)
2. CPU prediction from JPEG files to CSV: predict.py's Predictor as shipped vs a plain baseline
   (timm model, PIL decode, torchvision transforms, eager fp32, default memory format, batch 32), same images
3. training throughput: frozen-backbone stage and full fine-tuning, ours vs the same plain baseline
4. time to accuracy: wall time and test accuracy of a full training run (its metrics.json)

Every figure is measured in this run, on this machine; nothing is asserted.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from crack_lightning.config.schema import DataConfig
from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.images import decode_image
from crack_lightning.data.loaders import compute_features
from crack_lightning.data.records import Record
from crack_lightning.data.scan import list_images
from crack_lightning.data.transforms import eval_transform, resize_op, train_transform
from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path, write_results
from crack_lightning.hardware import describe
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.predictor import Predictor, label_from_path, write_rows
from crack_lightning.models.checkpoint import load_model
from crack_lightning.tensor_ops import area_resize, model_input
from crack_lightning.training.features import feature_extractor

CLASSES = ("Negative", "Positive")


def sample_files(root: Path, n: int) -> list[Path]:
    files = []
    for cls in ("Positive", "Negative"):
        files += list_images(root / cls)[: n // 2]
    return files


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


# ---------------------------------------------------------------- 1. data pipeline
def bench_pipeline(files: list[Path], pre) -> dict:
    out = {}
    for name, tf in (("train_decode_augment", train_transform(pre, "light")),
                     ("eval_decode_preprocess", eval_transform(pre)),
                     ("decode_only_resize_on_gpu", None)):  # what a worker does when the GPU resizes
        t0 = time.perf_counter()
        for f in files:
            image = decode_image(f)
            if tf is not None:
                tf(image=image)
        out[name] = {"images_per_s_per_worker": rate(len(files), time.perf_counter() - t0), "images": len(files),
                     "image_size": pre.size}
    return out


def check_device_resize(files: list[Path], pre, device: torch.device) -> dict:
    """Pixels where the device's area resize differs from OpenCV's (the loader's) on real images."""
    import numpy as np

    images = [decode_image(f) for f in files]
    images = [im for im in images if im.shape == images[0].shape]
    x = torch.from_numpy(np.stack(images)).to(device)
    got = area_resize(x, pre.size).cpu().numpy()
    ref = np.stack([resize_op(pre)(image=im)["image"] for im in images])
    return {"images": len(images), "from": list(images[0].shape[:2]), "to": pre.size, "device": str(device),
            "pixels_differing": int((got != ref).sum()), "pixels": int(ref.size)}


# ---------------------------------------------------------------- 2. prediction
class PlainFiles(Dataset):
    """Baseline input pipeline: PIL decode + torchvision transforms."""

    def __init__(self, files, pre):
        from torchvision import transforms as T

        self.files = files
        self.tf = T.Compose([T.Resize((pre.size, pre.size)), T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.tf(im.convert("RGB")), i


def plain_model(checkpoint: Path, device: torch.device) -> torch.nn.Module:
    m = load_model(checkpoint)
    net = torch.nn.Sequential(m.backbone, m.head).eval().to(device)
    # CPU: eager fp32, default memory format. GPU: the plain pipeline of the issue (bf16, channels_last)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def plain_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_predict(files: list[Path], checkpoint: Path, workers: int, batch: int, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        # ours, as shipped (predict.py defaults for this device)
        t0 = time.perf_counter()
        predictor = Predictor(checkpoint, str(device), num_workers=workers, batch_size=batch)
        load_s = time.perf_counter() - t0
        if gpu:  # one untimed pass over a few batches: CUDA context, cuDNN autotuning
            list(predictor.iter_rows(files[: batch * 2], progress=False))
        t0 = time.perf_counter()
        rows = write_rows(predictor.iter_rows(files, progress=False), Path(tmp) / "ours.csv")
        ours_s = time.perf_counter() - t0
        assert len(rows) == len(files)
        t0 = time.perf_counter()  # the same loader with no model: the most the pipeline can feed
        loaded = sum(len(b.index) for b in predictor.loader(files))
        loader_s = time.perf_counter() - t0
        # plain baseline
        model = plain_model(checkpoint, device)
        loader = DataLoader(PlainFiles(files, predictor.pre), batch_size=batch if gpu else 32, num_workers=workers,
                            pin_memory=gpu)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            for k, (x, _) in enumerate(loader):  # same warm-up as ours
                model(plain_batch(x, device))
                if not gpu or k >= 1:
                    break
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu), \
                open(Path(tmp) / "plain.csv", "w", newline="") as f:
            w = csv.writer(f)
            for x, idx in loader:
                probs = torch.sigmoid(model(plain_batch(x, device)).float().squeeze(1)).cpu()
                for i, p in zip(idx.tolist(), probs.tolist()):
                    w.writerow([files[i], p])
        plain_s = time.perf_counter() - t0
    engine = "onnxruntime" if predictor._run is not None else "torch bf16 channels_last" if gpu else "torch"
    return {
        "images": len(files), "image_size": predictor.pre.size, "decode_workers": predictor.num_workers,
        "device": str(device),
        "ours": {"images_per_s": rate(len(files), ours_s), "batch": predictor.batch_size, "engine": engine,
                 "model_load_s": round(load_s, 2), "loader_alone_images_per_s": rate(loaded, loader_s),
                 "resize_on": "gpu" if predictor.defer_resize else "loader workers"},
        "plain_baseline": {"images_per_s": rate(len(files), plain_s), "batch": batch if gpu else 32,
                           "engine": "torch bf16 channels_last, PIL + torchvision" if gpu else "torch eager fp32"},
        "speedup": round(plain_s / ours_s, 2),
    }


# ---------------------------------------------------------------- 3. training
def train_steps(model, loader, steps: int, frozen: bool, channels_last: bool,
                device: torch.device = torch.device("cpu")) -> float:
    """Seconds per image for ``steps`` optimiser steps, loading included.

    A warm-up pass comes first (workers start, first kernels); the timed pass is
    a fresh iteration whose clock starts before its first batch is asked for, so
    no batch was prefetched for free. uint8 batches (ours on a GPU) are
    normalised on the device; on a GPU both sides use bf16 autocast.
    """
    gpu = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def run(n: int) -> int:
        done = 0
        while n > 0:
            for batch in loader:
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                x = model_input(model.pre, x)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
                    if frozen:
                        with torch.no_grad():
                            feats = model.backbone(x)
                        logits = model.head(feats).squeeze(1)
                    else:
                        logits = model.head(model.backbone(x)).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y.float())
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += len(y)
                n -= 1
                if n == 0:
                    break
        return done

    run(3 if gpu else 1)
    sync(device)
    t0 = time.perf_counter()
    done = run(steps)
    sync(device)
    return (time.perf_counter() - t0) / done


def records(files: list[Path]) -> list[Record]:
    """Labelled training records for the project's own loaders (label from the class folder)."""
    return [Record(str(f), label_from_path(f, CLASSES), "", "train") for f in files]


class PlainLabelled(PlainFiles):
    def __getitem__(self, i):
        x, _ = super().__getitem__(i)
        return x, float(label_from_path(self.files[i], CLASSES))


def bench_training(files: list[Path], checkpoint: Path, workers: int, steps: int, epochs: int,
                   device: torch.device = torch.device("cpu"), batch: int = 32) -> dict:
    gpu = device.type == "cuda"
    model = load_model(checkpoint, trainable=True).to(device)
    pre = model.pre
    plain_loader = DataLoader(PlainLabelled(files, pre), batch_size=batch, num_workers=workers, shuffle=True,
                              pin_memory=gpu, persistent_workers=workers > 0)
    out = {"image_size": pre.size, "batch": batch, "decode_workers": workers, "device": str(device)}

    # frozen stage, plain: every epoch decodes, augments and runs the backbone again
    model.freeze_backbone(True)
    model.train()
    plain_frozen = 1 / train_steps(model, plain_loader, steps, frozen=True, channels_last=gpu, device=device)
    # frozen stage, ours: backbone once (ONNX Runtime on a CPU, bf16 on a GPU), then the head on stored features
    extract = feature_extractor(model, "auto", device)
    dm = CrackDataModule(DataConfig(batch_size=batch, num_workers=workers), records(files), pre,
                         device_normalize=gpu, defer_resize=gpu)  # the loaders train() builds on this device
    ev = dm.eval_loader("train")
    t0 = time.perf_counter()
    cached = compute_features(extract, ev, "bench")
    feat_s = (time.perf_counter() - t0) / len(files)
    # out of inference mode, for autograd
    feats, labels = cached.features.clone().to(device), cached.labels.clone().float().to(device)
    head = torch.nn.Linear(feats.shape[1], 1).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        for i in range(0, len(feats), batch):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats[i:i + batch]).squeeze(1),
                                                                        labels[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    sync(device)
    head_s = (time.perf_counter() - t0) / (reps * len(feats))
    ours_frozen = epochs / (feat_s + epochs * head_s)
    out["frozen"] = {
        "plain_baseline_images_per_s": round(plain_frozen, 1),
        "ours_feature_extraction_images_per_s": round(1 / feat_s, 1),
        "ours_head_epoch_images_per_s": round(1 / head_s, 1),
        "epochs_assumed": epochs,
        "ours_effective_images_per_s": round(ours_frozen, 1),
        "speedup": round(ours_frozen / plain_frozen, 2),
    }
    # full fine-tuning: plain (default memory format) vs ours (channels_last, albumentations pipeline)
    model.freeze_backbone(False)
    model.train()
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    plain_ft = 1 / train_steps(model, plain_loader, steps, frozen=False, channels_last=gpu, device=device)
    model = model.to(memory_format=torch.channels_last)
    ours_loader = dm.train_dataloader()
    ours_ft = 1 / train_steps(model, ours_loader, steps, frozen=False, channels_last=True, device=device)
    out["finetune"] = {"plain_baseline_images_per_s": round(plain_ft, 1), "ours_images_per_s": round(ours_ft, 1),
                       "speedup": round(ours_ft / plain_ft, 2), "steps": steps}
    return out


# ---------------------------------------------------------------- 4. time to accuracy
def time_to_accuracy(run: Path | None) -> dict | None:
    if not run or not (run / "metrics.json").is_file():
        return None
    m = json.loads((run / "metrics.json").read_text())
    epochs = m["stages"].get("finetune", {}).get("epoch_times", [])
    return {"run": str(run), "wall_time_s": m["wall_time_s"], "test_acc": m["after"]["test"]["acc"],
            "test_f1": m["after"]["test"]["f1"], "hardware": m["hardware"],
            "train_images": sum(m["counts"]["train"].values()),
            "finetune_epoch_s": [e["train_s"] for e in epochs],
            "note": "wall time of the whole run from a cold start: scan, split, features, baseline, training, test; "
                    "finetune_epoch_s: each full fine-tuning epoch over the training split, loading included"}


def table(r: dict) -> str:
    p, t = r["predict"], r["training"]
    lines = [
        f"Hardware: {describe(r['hardware'])} (benchmarked on {p.get('device', 'cpu')}); "
        f"image size {p['image_size']}; training batch {t['batch']}, {t['decode_workers']} loader worker(s)",
        "",
        "| measurement | plain baseline | crack_lightning | ratio |",
        "|---|---|---|---|",
        f"| data: decode + train aug, img/s per worker | | {r['pipeline']['train_decode_augment']['images_per_s_per_worker']} | |",
        f"| data: decode + eval preprocessing, img/s per worker | | {r['pipeline']['eval_decode_preprocess']['images_per_s_per_worker']} | |",
        f"| data: decode only (resize left to the GPU), img/s per worker | | "
        f"{r['pipeline']['decode_only_resize_on_gpu']['images_per_s_per_worker']} | |",
        f"| predict, JPEG -> CSV, img/s ({p['images']} images, {p['decode_workers']} decode worker(s)) | "
        f"{p['plain_baseline']['images_per_s']} (batch {p['plain_baseline']['batch']}) | {p['ours']['images_per_s']} ({p['ours']['engine']}, "
        f"batch {p['ours']['batch']}, resize in {p['ours']['resize_on']}) | {p['speedup']}x |",
        f"| predict's loader alone (no model), img/s | | {p['ours']['loader_alone_images_per_s']} | |",
        f"| training, frozen backbone, img/s ({t['frozen']['epochs_assumed']} epochs) | "
        f"{t['frozen']['plain_baseline_images_per_s']} | {t['frozen']['ours_effective_images_per_s']} "
        f"(features {t['frozen']['ours_feature_extraction_images_per_s']} once, head "
        f"{t['frozen']['ours_head_epoch_images_per_s']}/epoch) | {t['frozen']['speedup']}x |",
        f"| training, full fine-tuning, img/s | {t['finetune']['plain_baseline_images_per_s']} | "
        f"{t['finetune']['ours_images_per_s']} | {t['finetune']['speedup']}x |",
    ]
    dr = r.get("device_resize")
    if dr:
        lines.append(f"| GPU area resize vs OpenCV ({dr['images']} images, {dr['from'][0]}x{dr['from'][1]} -> "
                     f"{dr['to']}), pixels differing | | {dr['pixels_differing']} of {dr['pixels']} | |")
    tta = r.get("time_to_accuracy")
    if tta:
        lines.append(f"| full data, cold start to tested model | | {tta['wall_time_s']:.0f} s, test acc "
                     f"{tta['test_acc']:.4f} | |")
        if tta.get("finetune_epoch_s"):
            lines.append(f"| full fine-tuning epoch over the training split ({tta['train_images']} images) | | "
                         f"{min(tta['finetune_epoch_s']):.1f} s best, {tta['finetune_epoch_s'][-1]:.1f} s last | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/sample", help="folder with Positive/ and Negative/ JPEGs")
    ap.add_argument("--checkpoint", default="models/crack_lite0.pt")
    ap.add_argument("--run", default=None, help="a finished full-data run folder, for time to accuracy")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--train-images", type=int, default=320)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=20, help="frozen-stage epochs assumed for the effective rate")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="batch size (the GPU rule is 256)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args()
    args.out = str(results_path(args.out, "run"))  # resolved once: every write goes to one file

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.data)
    files = sample_files(root, args.images)
    pre = load_model(args.checkpoint).pre
    results = {"hardware": hardware(), "data": str(root)}
    print("1/4 data pipeline ...", flush=True)
    results["pipeline"] = bench_pipeline(files[:400], pre)
    if device.type == "cuda":
        results["device_resize"] = check_device_resize(files[:512], pre, device)
        print(f"   {results['device_resize']}", flush=True)
    print("2/4 prediction ...", flush=True)
    results["predict"] = bench_predict(files, Path(args.checkpoint), args.workers, args.batch, device)
    print(f"   {results['predict']}", flush=True)
    print("3/4 training ...", flush=True)
    results["training"] = bench_training(sample_files(root, args.train_images), Path(args.checkpoint),
                                         args.workers, args.steps, args.epochs, device, args.batch)
    print(f"   {results['training']}", flush=True)
    print("4/4 time to accuracy ...", flush=True)
    results["time_to_accuracy"] = time_to_accuracy(Path(args.run) if args.run else None)
    write_results(args.out, results, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
