#!/usr/bin/env python
"""Crack segmentation speed and memory on this machine: photos/s of a 512x512 and a 4032x3024 photo,
ONNX Runtime (what predict.py --segment runs on a CPU) beside PyTorch eager, and the peak memory of the
whole ``predict.py --segment`` process on a 24-megapixel photo.

    python bench/segment_speed.py --checkpoint models/crack_seg_lite0.pt

Writes results/segment_speed/. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crack_lightning.files import RESULTS_HELP, results_path, write_results
from crack_lightning.hardware import describe, machine
from crack_lightning.inference.segment import load_segmenter
from crack_lightning.models.segmentation import probability_map

ROOT = Path(__file__).resolve().parent.parent


def photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.repeat(rng.normal(160, 12, (h, w, 1)).clip(0, 255), 3, 2).astype(np.uint8)
    img[h // 2 - 2:h // 2 + 2, :] = 60  # one long crack
    return img


def rate(model, image: np.ndarray, repeats: int) -> float:
    probability_map(image, model)  # warm-up (ONNX Runtime's first run, allocator)
    t0 = time.perf_counter()
    for _ in range(repeats):
        probability_map(image, model)
    return round(repeats / (time.perf_counter() - t0), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="models/crack_seg_lite0.pt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help=RESULTS_HELP)
    args = ap.parse_args()
    out = results_path(args.out, "segment_speed")
    results = {"hardware": machine(), "checkpoint": args.checkpoint, "photos_per_s": {}}
    for engine in ("onnx", "torch"):
        model = load_segmenter(args.checkpoint, engine=engine)
        results["photos_per_s"][engine] = {"512x512": rate(model, photo(512, 512), args.repeats * 5),
                                           "4032x3024": rate(model, photo(3024, 4032), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "24mp.jpg"
        Image.fromarray(photo(4000, 6000)).save(big, quality=90)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "predict.py", "--segment", "--checkpoint", args.checkpoint, str(big),
                              "--output", str(Path(tmp) / "out")], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if res.returncode != 0:
            raise SystemExit(res.stderr[-2000:])
    results["24mp"] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}
    write_results(out, results, table(results))
    return 0


def table(results: dict) -> str:
    r = results["photos_per_s"]
    rows = [f"| {size} | {r['onnx'][size]} | {r['torch'][size]} | {r['onnx'][size] / r['torch'][size]:.2f}x |"
            for size in ("512x512", "4032x3024")]
    big = results["24mp"]
    return "\n".join([f"# Crack segmentation speed ({describe(results['hardware'])})", "",
                      "| photo | ONNX Runtime, photos/s | PyTorch eager, photos/s | ratio |", "|---|---|---|---|",
                      *rows, "", f"`predict.py --segment` on one 6000x4000 (24 MP) photo: {big['seconds']} s, "
                      f"peak memory {big['peak_rss_mb']} MB (whole process)."]) + "\n"

if __name__ == "__main__":
    sys.exit(main())
