#!/usr/bin/env python
"""The plain baseline a user would write: timm + torchvision + a DataLoader, JPEG files to a CSV.

    python bench/plain_predict.py FOLDER --checkpoint models/crack_lite0.pt --output plain.csv

The same network and weights as ``predict.py`` (read from the release file with ``torch.load``),
PIL decoding, torchvision's resize and normalisation, eager PyTorch in float32, one decode worker:
what ``bench/startup.py`` times ``predict.py`` against, as a whole process.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class Files(Dataset):
    def __init__(self, files: list[Path], tf):
        self.files, self.tf = files, tf

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as im:
            return self.tf(im.convert("RGB")), i


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--checkpoint", default="models/crack_lite0.pt")
    ap.add_argument("--output", default="plain.csv")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    hp, pre, sd = ckpt["hyper_parameters"], ckpt["preprocessing"], ckpt["state_dict"]
    backbone = timm.create_model(hp["backbone"], pretrained=False, num_classes=0)
    backbone.load_state_dict({k[len("backbone."):]: v.float() for k, v in sd.items() if k.startswith("backbone.")})
    weight = sd["head.1.weight"].float()
    head = torch.nn.Linear(weight.shape[1], 1)
    head.load_state_dict({"weight": weight, "bias": sd["head.1.bias"].float()})
    net = torch.nn.Sequential(backbone, head).eval()
    tf = transforms.Compose([transforms.Resize((pre["size"], pre["size"])), transforms.ToTensor(),
                             transforms.Normalize(pre["mean"], pre["std"])])
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    loader = DataLoader(Files(files, tf), batch_size=args.batch, num_workers=args.workers)
    threshold = float(sd["threshold"])
    with torch.inference_mode(), open(args.output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "probability", "label"])
        for x, idx in loader:
            probs = torch.sigmoid(net(x).squeeze(1))
            for i, p in zip(idx.tolist(), probs.tolist()):
                w.writerow([files[i], f"{p:.6f}", hp["class_names"][int(p >= threshold)]])
    print(f"{len(files)} image(s) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
