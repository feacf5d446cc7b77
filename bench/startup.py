#!/usr/bin/env python
"""Start-up and whole-process time: what a user waits for, from the shell prompt to the answer.

    python bench/startup.py --data ../shared/data/mendeley --images 1000

Each figure is a fresh process, timed from outside (the median of ``--repeats``):
``predict.py --help``, ``train.py --help``, ``predict.py`` on one photo (the ONNX export cached,
as from the second run on; and cold, with an empty cache), and ``predict.py`` over ``--images``
JPEG files against ``bench/plain_predict.py`` (timm + torchvision + a DataLoader, eager PyTorch)
on the same files: the whole process, start-up included. Writes ``results/startup/``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crack_lightning.files import RESULTS_HELP, results_path, write_results
from crack_lightning.hardware import describe, machine

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict, repeats: int, before=None) -> dict:
    """Median and all wall times of ``cmd`` as a fresh process (``before()`` runs untimed before each)."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if res.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return {"median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times]}


def jpeg_files(root: Path, n: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG files under {root}")
    step = max(1, len(files) // n)
    return (files[::step] * (n // max(1, len(files[::step])) + 1))[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/sample", help="a folder with JPEG files (recursive)")
    ap.add_argument("--images", type=int, default=1000, help="files for the whole-process comparison")
    ap.add_argument("--checkpoint", default="models/crack_lite0.pt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help=RESULTS_HELP)
    args = ap.parse_args()
    out = results_path(args.out, "startup")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        env = {**os.environ, "CRACK_LIGHTNING_CACHE": str(cache)}
        photo = jpeg_files(Path(args.data), 1)[0]
        folder = tmp / "jpegs"
        folder.mkdir()
        for k, f in enumerate(jpeg_files(Path(args.data), args.images)):  # distinct names: every file is predicted
            shutil.copy(f, folder / f"{k:05d}_{f.name}")
        one = [py, "predict.py", "--checkpoint", args.checkpoint, str(photo), "--output", str(tmp / "one.csv")]
        subprocess.run(one, cwd=ROOT, env=env, capture_output=True)  # fills the ONNX cache
        results = {
            "hardware": machine(), "data": args.data, "images": args.images,
            "predict_help": timed([py, "predict.py", "--help"], env, args.repeats),
            "train_help": timed([py, "train.py", "--help"], env, args.repeats),
            "one_photo": timed(one, env, args.repeats),
            "one_photo_cold": timed(one, env, args.repeats, before=lambda: shutil.rmtree(cache, ignore_errors=True)),
            "ours_whole": timed([py, "predict.py", "--checkpoint", args.checkpoint, str(folder), "--output",
                                 str(tmp / "ours.csv")], env, args.repeats),
            "plain_whole": timed([py, "bench/plain_predict.py", str(folder), "--checkpoint", args.checkpoint,
                                  "--output", str(tmp / "plain.csv")], env, args.repeats),
        }
    ours, plain = results["ours_whole"]["median_s"], results["plain_whole"]["median_s"]
    results["whole_speedup"] = round(plain / ours, 2)
    n = args.images
    md = [f"# Start-up and whole process ({describe(results['hardware'])})", "",
          "| what | median wall time (s) | runs (s) |", "|---|---|---|"]
    for key, label in [("predict_help", "`predict.py --help`"), ("train_help", "`train.py --help`"),
                       ("one_photo", "`predict.py` one photo (ONNX export cached)"),
                       ("one_photo_cold", "`predict.py` one photo (first run: exports the model)"),
                       ("ours_whole", f"`predict.py` {n} JPEGs, whole process"),
                       ("plain_whole", f"`bench/plain_predict.py` {n} JPEGs, whole process")]:
        md.append(f"| {label} | {results[key]['median_s']} | {', '.join(map(str, results[key]['runs_s']))} |")
    md += ["", f"Whole process on {n} JPEGs: {ours} s vs {plain} s = **{results['whole_speedup']}x** "
               f"({n / ours:.0f} vs {n / plain:.0f} images/s)."]
    write_results(out, results, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
