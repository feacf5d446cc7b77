"""Shared fixtures: small generated image folders and one tiny trained run reused by several tests."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# ONNX exports are cached on disk (crack_lightning.models.runtime): the tests use a cache of their own
os.environ.setdefault("CRACK_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="crack_lightning_test_cache_"))
SAMPLE = ROOT / "data" / "sample"


def synthetic_patch(rng: np.random.Generator, crack: bool, size: int = 64) -> np.ndarray:
    """A concrete-like grey texture; a crack is a dark meandering line across it."""
    base = rng.normal(170, 12, (size, size, 1)).clip(0, 255)
    img = np.repeat(base, 3, axis=2)
    if crack:
        x = rng.integers(size // 4, 3 * size // 4)
        for y in range(size):
            x = int(np.clip(x + rng.integers(-1, 2), 2, size - 3))
            img[y, x - 1:x + 2] = 40
    return img.astype(np.uint8)


def make_folder(root: Path, n_per_class: int = 12, size: int = 64, seed: int = 0,
                classes=("Negative", "Positive")) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(synthetic_patch(rng, bool(label), size)).save(d / f"{name[:3]}_{i:03d}.jpg", quality=95)
    return root


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``train.py`` / ``predict.py`` as a user would; capture output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# a training run in seconds: the bundled quickstart config, no pretrained weights, 32 px, few images per batch
TINY = ["--config", str(ROOT / "configs/quickstart.yaml"), "--model.pretrained", "none", "--model.image_size", "32",
        "--data.num_workers", "0", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false",
        "--data.val_fraction", "0.25", "--data.test_fraction", "0.25", "--train.cache_features", "false"]


class Ran(NamedTuple):
    """What a command did, as :class:`subprocess.CompletedProcess` names it (and unpacks as a tuple)."""

    returncode: int
    stdout: str
    stderr: str


def run_main(script: str, *args, cwd: Path | None = ROOT) -> Ran:
    """Run ``train.py`` / ``predict.py`` in this process, exactly as the script does (``guarded``):
    the exit code and what the user reads, without a Python start-up per check. Cases that need
    a real process (signals, DDP, environment read at import) use :func:`run_cli`. ``cwd``: the folder it
    runs in (``None``: the test's own)."""
    from crack_lightning.cli.guard import guarded
    from crack_lightning.cli.predict import predict_main
    from crack_lightning.cli.train import train_main

    main = {"train.py": train_main, "predict.py": predict_main}[Path(script).name]
    out, err = io.StringIO(), io.StringIO()
    back, sigterm = os.getcwd(), signal.getsignal(signal.SIGTERM)
    os.chdir(cwd or back)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = guarded(lambda: main([str(a) for a in args]))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
    finally:
        os.chdir(back)
        signal.signal(signal.SIGTERM, sigterm)
    return Ran(code, out.getvalue(), err.getvalue())


def one_error(code: int, err: str) -> str:
    """The one ``error:`` line a user mistake prints (exit 2, no traceback)."""
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One real (tiny) training run on the bundled Mendeley sample, shared by prediction/export tests."""
    out = tmp_path_factory.mktemp("runs")
    res = run_main("train.py", "--config", str(ROOT / "configs/quickstart.yaml"),
                  "--data.root", str(SAMPLE), "--output_dir", str(out), "--run_name", "tiny",
                  "--train.frozen.epochs", "6", "--model.image_size", "128",
                  "--trainer.enable_progress_bar", "false")
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """``serve.py`` in its own process with ``args``, once it answers."""
    key = args[args.index("--api-key") + 1] if "--api-key" in args else ""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/healthz", headers={"X-API-Key": key}, timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not come up")


BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch_chromium(pw):
    """Debian's chromium, headless, through a ``sync_playwright()`` handle."""
    return pw.chromium.launch(executable_path=chromium(), args=BROWSER_ARGS)


def drop_files(page, paths) -> None:
    """Drop files on the page's drop zone, as a user drags them in from a file manager."""
    import base64
    import mimetypes

    page.evaluate("""(files) => {
        const dt = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name, {type: f.type}));
        }
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", [{"name": Path(p).name, "b64": base64.b64encode(Path(p).read_bytes()).decode(),
            "type": mimetypes.guess_type(str(p))[0] or "application/octet-stream"} for p in paths])


def chromium() -> str:
    """Debian's chromium, which the browser tests drive through Playwright (``executable_path``)."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the browser tests need Debian's chromium (apt-get install chromium); .ci/run installs it")
    return path
