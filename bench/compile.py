#!/usr/bin/env python
"""Does torch.compile pay for this model? The model alone, on random tensors, eager vs compiled.

    python bench/compile.py                       # CPU -> results/compile/compile.json, results/compile/compile.md
    python bench/compile.py --device cuda --out results/compile/gpu.json

Five rows on a CPU, four on a GPU; same model (the released checkpoint), same batch, each timed after two warm-up calls:
  inference  eager (inference_mode, channels_last; bf16 autocast on a GPU) vs torch.compile,
             and on a CPU ONNX Runtime (what predict.py runs there)
  training   one full fine-tuning step (forward, BCE, backward, AdamW) eager vs compiled
Compiling is paid at start-up and again for every new batch shape (the last, partial batch
of an epoch or a folder): both costs are reported next to the speed-up, because a run must
be long enough to earn them back. torch.compile starts from empty on-disk caches, as a
first run does (`--warm-cache`: what a repeated run pays). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path, write_results
from crack_lightning.hardware import describe
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.export import ProbabilityModel
from crack_lightning.models.checkpoint import load_model
from crack_lightning.models.runtime import onnx_runner


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(step: Callable[[torch.Tensor], object], x: torch.Tensor, partial: torch.Tensor, steps: int,
            device: torch.device) -> dict:
    """First call (compiles, if compiled), a call on a new batch shape, then ``steps`` timed calls."""
    first = timed(lambda: step(x), device)
    new_shape = timed(lambda: step(partial), device)
    step(x)
    step(x)
    seconds = timed(lambda: [step(x) for _ in range(steps)], device)
    return {"images_per_s": round(steps * len(x) / seconds, 1), "first_call_s": round(first, 2),
            "new_batch_shape_s": round(new_shape, 2)}


def inference_steps(net: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], object]:
    gpu = device.type == "cuda"

    @torch.inference_mode()
    def step(x: torch.Tensor):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            return net(x)
    return step


def training_steps(net: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], object]:
    gpu = device.type == "cuda"
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step(x: torch.Tensor):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            logits = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(logits.float()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def fresh_net(checkpoint: Path, device: torch.device, train: bool) -> torch.nn.Module:
    """Backbone + head with the sigmoid (inference) or the logits (training), channels_last."""
    model = load_model(checkpoint).float()
    net = ProbabilityModel(model) if not train else torch.nn.Sequential(model.backbone, model.head)
    net = net.to(device).to(memory_format=torch.channels_last)
    net.train(train)
    for p in net.parameters():
        p.requires_grad_(train)
    return net


def pays_back(row: dict) -> str:
    if "speedup_vs_eager" not in row:
        return ""
    return "never (not faster)" if row["break_even_images"] is None else f"{row['break_even_images']:,}"


def compare(eager: dict, compiled: dict) -> None:
    """Speed-up, and the images after which compiling has paid for its start-up and one
    new batch shape (None: never, it is not faster)."""
    compiled["speedup_vs_eager"] = round(compiled["images_per_s"] / eager["images_per_s"], 2)
    gain = 1 / eager["images_per_s"] - 1 / compiled["images_per_s"]
    cost = compiled["first_call_s"] + compiled["new_batch_shape_s"] - eager["first_call_s"] - eager["new_batch_shape_s"]
    compiled["break_even_images"] = round(cost / gain) if gain > 0 else None


def table(results: dict) -> str:
    hw = results["hardware"]
    md = [f"torch.compile (mode {results['compile_mode']}, backend {results['compile_backend']}) vs eager, model "
          f"alone on random tensors: {describe(hw)}, {results['image_size']} px, batch {results['batch']}, {results['precision']}, "
          f"channels_last, {results['steps']} timed calls, {results['compile_cache']} compile cache\n",
          "| row | img/s | first call, s | new batch shape, s | vs eager | pays back after (images) |",
          "|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        if "error" in r:
            md.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        md.append(f"| {name} | {r['images_per_s']} | {r['first_call_s']} | {r['new_batch_shape_s']} | "
                  f"{r.get('speedup_vs_eager', '')} | {pays_back(r)} |")
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="models/crack_lite0.pt")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=0, help="0: 32 on a CPU, 256 on a GPU (what predict.py uses)")
    ap.add_argument("--steps", type=int, default=0, help="timed calls per row; 0: 20 on a CPU, 50 on a GPU")
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend (inductor: the real measurement; aot_eager: checks this script "
                         "without a C++ compile, as the test suite does)")
    ap.add_argument("--rows", nargs="+", choices=("inference", "training"), default=["inference", "training"])
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep torch.compile's on-disk caches (default: empty ones, what a first run pays)")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args()
    args.out = str(results_path(args.out, "compile"))  # resolved once: every write goes to one file

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if not args.warm_cache:  # read when compiling, so setting them here is in time
        cold = tempfile.mkdtemp(prefix="compile_cache_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = cold, os.path.join(cold, "triton")
    batch, steps = args.batch or (256 if gpu else 32), args.steps or (50 if gpu else 20)
    size = load_model(args.checkpoint).pre.size
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    partial = x[: max(1, batch // 3)].contiguous(memory_format=torch.channels_last)

    hw = hardware(str(device))
    results = {"hardware": hw, "device": str(device), "batch": batch, "image_size": size, "steps": steps,
               "compile_mode": args.mode, "compile_backend": args.backend,
               "compile_cache": "warm" if args.warm_cache else "cold", "precision": "bf16 autocast" if gpu else "fp32", "rows": {}}
    rows = results["rows"]
    for kind, make in (("inference", inference_steps), ("training", training_steps)):
        if kind not in args.rows:
            continue
        for how in ("eager", "compiled"):
            net = fresh_net(Path(args.checkpoint), device, train=kind == "training")
            if how == "compiled":
                net = torch.compile(net, mode=args.mode, backend=args.backend)
            try:
                rows[f"{kind}, {how}"] = measure(make(net, device), x, partial, steps, device)
            except Exception as exc:  # e.g. no working compiler/Triton: a finding, not a crash of the run
                rows[f"{kind}, {how}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"{kind:9s} {how:8s} {rows[f'{kind}, {how}']}", flush=True)
        if "error" not in rows[f"{kind}, compiled"]:
            compare(rows[f"{kind}, eager"], rows[f"{kind}, compiled"])
        if kind == "inference" and not gpu:
            run = onnx_runner(fresh_net(Path(args.checkpoint), device, train=False), size)
            rows["inference, onnxruntime"] = measure(run, x.contiguous(), partial.contiguous(), steps, device)
            print(f"inference onnxruntime {rows['inference, onnxruntime']}", flush=True)
        write_results(args.out, results, table(results))  # after each pair: a time limit keeps what was measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
