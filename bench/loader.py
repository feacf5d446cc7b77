#!/usr/bin/env python
"""How fast predict.py's loader can feed a model, with no model: what each way of shipping
the batches costs the decode workers.

    python bench/loader.py --data ../shared/data/mendeley --images 4096 --workers 1 2

Three ways, same files, same batch size, each after one warm-up pass:
  float32   normalised floats, resized in the worker (the ONNX Runtime path on a CPU)
  uint8     uint8 at the model's size, resized in the worker (PyTorch engine on a CPU)
  deferred  uint8 at the files' own size; the model's device resizes (PyTorch engine on a GPU)
Writes results/loader/loader.json and results/loader/loader.md. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path, write_results
from crack_lightning.hardware import describe
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.outputs import collect_inputs
from crack_lightning.inference.predictor import Predictor

WAYS = {  # name: (Predictor engine, resize_on_device)
    "float32": ("onnx", False),
    "uint8": ("torch", False),
    "deferred": ("torch", True),
}


def rate(predictor: Predictor, files: list[Path]) -> dict:
    """Images per second over one pass of the loader (workers started inside the timing), and
    the CPU time the main process spent per image receiving the batches: the ceiling that
    remains when workers are many (a GPU host adds a pin-memory copy on top)."""
    sum(len(b.index) for b in predictor.loader(files[: predictor.batch_size * 2]))  # warm-up: page cache
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(b.index) for b in predictor.loader(files))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": round(n / wall, 1), "main_process_cpu_us_per_image": round(cpu / n * 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/sample", help="folder of images (searched recursively)")
    ap.add_argument("--checkpoint", default="models/crack_lite0.pt")
    ap.add_argument("--images", type=int, default=4096, help="every k-th file so that this many are read")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args()
    args.out = str(results_path(args.out, "loader"))  # resolved once: every write goes to one file

    files = collect_inputs([args.data])
    files = files[:: max(1, len(files) // args.images)][: args.images]
    rows = {}
    for way, (engine, on_device) in WAYS.items():
        predictor = Predictor(args.checkpoint, engine=engine, batch_size=args.batch, resize_on_device=on_device)
        rows[way] = {}
        for w in args.workers:
            predictor.num_workers = w
            rows[way][str(w)] = rate(predictor, files)
            print(f"{way:9s} {w} worker(s): {rows[way][str(w)]}", flush=True)
    results = {"hardware": hardware(), "data": args.data,
               "images": len(files), "batch": args.batch, "image_size": predictor.pre.size,
               "rates": rows}
    head = " | ".join(f"{w} worker(s), img/s | main process, CPU us/img" for w in args.workers)
    md = [f"predict.py's loader with no model: {len(files)} images from {args.data}, batch {args.batch}, "
          f"{describe(results['hardware'])}\n", f"| loader ships | {head} |",
          "|---" * (2 * len(args.workers) + 1) + "|"]
    md += [f"| {way} | " + " | ".join(f"{r['images_per_s']} | {r['main_process_cpu_us_per_image']}"
                                      for r in (rows[way][str(w)] for w in args.workers)) + " |" for way in rows]
    write_results(args.out, results, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
