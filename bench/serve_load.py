#!/usr/bin/env python
"""Server under load: 1, 4 and 16 concurrent clients on loopback, beside predict.py on the same machine.

    python bench/serve_load.py --data data/sample --seconds 20

Starts ``serve.py`` in its own process. Each client sends one patch per request
(``POST /v1/predict``), the next as soon as the answer arrives, until the level's
request count or time bound is reached. Reports images/s, p50/p95 latency, errors,
the server's peak memory, and the images/s of predict.py's Predictor (1 decode worker,
batch 32, ONNX Runtime on a CPU) over the same files in the same run, then one
``/v1/localize`` of a ~12-megapixel photo. Writes results/serve_load/serve_load.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
from crack_lightning.data.images import is_image_file
from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path, write_results
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.predictor import Predictor


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(checkpoint: str | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "serve.py", "--port", str(port)] + (["--checkpoint", checkpoint] if checkpoint else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server failed to start: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("server did not come up in 120 s")


async def load(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal errors, sent
        async with httpx.AsyncClient(timeout=120) as http:
            while sent < requests and time.perf_counter() < deadline:
                name, data = payloads[sent % len(payloads)]
                sent += 1
                t0 = time.perf_counter()
                r = await http.post(url + "/v1/predict", files=[("files", (name, data, "image/jpeg"))])
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or "error" in r.json()["results"][0]:
                    errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "seconds": round(wall, 2),
            "images_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1)}


def predict_rate(checkpoint: str | None, paths: list[Path]) -> dict:
    predictor = Predictor(checkpoint)
    list(predictor.iter_rows(paths[:64], progress=False))  # warm-up: worker start, first ONNX runs
    t0 = time.perf_counter()
    rows = list(predictor.iter_rows(paths, progress=False))
    wall = time.perf_counter() - t0
    return {"images": len(rows), "seconds": round(wall, 2), "images_per_s": round(len(rows) / wall, 1)}


def photo_12mp(paths: list[Path], out: Path) -> Path:
    """A 4086x2951 JPEG (18x13 patches of the data), the size of the photos Mendeley's patches came from."""
    rng = np.random.default_rng(0)
    cells = [np.asarray(Image.open(paths[i]).convert("RGB").resize((227, 227)))
             for i in rng.integers(0, len(paths), 18 * 13)]
    rows = [np.concatenate(cells[r * 18:(r + 1) * 18], axis=1) for r in range(13)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out, quality=92)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/sample", help="folder of image patches (searched recursively)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2000, help="at most this many requests per level")
    ap.add_argument("--seconds", type=float, default=20.0, help="at most this long per level")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args()
    args.out = str(results_path(args.out, "serve_load"))  # resolved once: every write goes to one file

    paths = sorted(p for p in Path(args.data).rglob("*") if is_image_file(p))
    if not paths:
        raise SystemExit(f"no images under {args.data}")
    payloads = [(p.name, p.read_bytes()) for p in paths]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.checkpoint, port)
    try:
        asyncio.run(load(url, payloads, 4, 64, 30))  # warm-up: first ONNX runs, thread pools
        levels = [asyncio.run(load(url, payloads, c, args.requests, args.seconds)) for c in args.clients]
        big = photo_12mp(paths, Path("/tmp/crack_serve_12mp.jpg"))
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/localize", files=[("file", (big.name, big.read_bytes(), "image/jpeg"))], timeout=600)
        localize_s = time.perf_counter() - t0
        assert r.status_code == 200, r.text[:500]
        tiles = len(r.json()["tiles"])
        server_peak = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    n = min(len(paths) * 5, args.requests)
    reference = predict_rate(args.checkpoint, (paths * 5)[:n])
    for lv in levels:
        lv["vs_predict_py"] = round(lv["images_per_s"] / reference["images_per_s"], 3)
    result = {
        "hardware": hardware(), "data": args.data,
        "levels": levels, "predict_py": reference, "server_peak_rss_mb": round(server_peak, 1),
        "localize_12mp": {"pixels": "4086x2951", "tiles": tiles, "seconds": round(localize_s, 2)},
    }
    md = ["| clients | requests | errors | images/s | vs predict.py | p50 ms | p95 ms |", "|---|---|---|---|---|---|---|"]
    md += [f"| {lv['clients']} | {lv['requests']} | {lv['errors']} | {lv['images_per_s']} | {lv['vs_predict_py']:.0%} "
           f"| {lv['p50_ms']} | {lv['p95_ms']} |" for lv in levels]
    md += ["", f"predict.py's Predictor, same machine, same run: {reference['images_per_s']} images/s "
               f"({reference['images']} images)", f"server peak memory: {result['server_peak_rss_mb']} MB",
           f"/v1/localize, 4086x2951 JPEG ({tiles} tiles): {result['localize_12mp']['seconds']} s", ""]
    write_results(args.out, result, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
