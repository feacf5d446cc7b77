"""The HTTP API through the real server (``serve.py`` in its own process), and the page in a real browser."""
from __future__ import annotations

import asyncio
import base64
import io
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, SAMPLE
from PIL import Image

KEY = "s3cret"
POSITIVES = sorted((SAMPLE / "Positive").glob("*.jpg"))[:3]
NEGATIVES = sorted((SAMPLE / "Negative").glob("*.jpg"))[:3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """One server for the module: API key required, 2 MB uploads, 8 images queued at most."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--api-key", KEY,
                             "--max-upload-mb", "2", "--max-queue", "8"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/healthz", headers={"X-API-Key": KEY}, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    else:
        raise AssertionError("server did not come up")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference():
    """What predict.py's Predictor says about the same files."""
    from crack_lightning.inference.predictor import Predictor

    predictor = Predictor(num_workers=0)
    rows = list(predictor.iter_rows(POSITIVES + NEGATIVES, progress=False))
    return predictor, {Path(r.path): r for r in rows}


def post(url, path, files, key=KEY, **kw):
    headers = {"X-API-Key": key} if key else {}
    return httpx.post(url + path, files=files, headers=headers, timeout=120, **kw)


def multipart(paths, field="files"):
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_health_and_key(server):
    h = httpx.get(server + "/healthz", headers={"X-API-Key": KEY}).json()
    assert h["status"] == "ok" and h["model"] == "crack_lite0.pt" and 0 < h["threshold"] < 1
    for headers in ({}, {"X-API-Key": "wrong"}):
        r = httpx.get(server + "/healthz", headers=headers)
        assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
    assert post(server, "/v1/predict", multipart(POSITIVES[:1]), key=None).status_code == 401
    assert httpx.get(server + "/").status_code == 200  # the page itself holds no data: served without the key
    assert "/v1/predict" in httpx.get(server + "/openapi.json").text


def test_predict_in_upload_order_equals_predict_py(server, reference):
    predictor, rows = reference
    paths = [NEGATIVES[0], POSITIVES[0], NEGATIVES[1], POSITIVES[1]]
    files = multipart(paths) + [("files", ("notes.txt", b"not an image", "text/plain"))]
    r = post(server, "/v1/predict", files)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "crack_lite0.pt" and body["threshold"] == pytest.approx(predictor.threshold)
    got = body["results"]
    assert [g["filename"] for g in got] == [p.name for p in paths] + ["notes.txt"]
    for g, p in zip(got, paths):
        assert g["probability"] == pytest.approx(rows[p].probability, abs=1e-5)
        assert g["label"] == rows[p].label == p.parent.name
    assert set(got[-1]) == {"filename", "error"} and "not an image" in got[-1]["error"]


def test_request_errors_are_json(server):
    r = httpx.post(server + "/v1/predict", headers={"X-API-Key": KEY}, files={"x": (None, "1")})
    assert r.status_code == 400 and "no file in the multipart field 'files'" in r.json()["error"]
    r = httpx.post(server + "/v1/predict", headers={"X-API-Key": KEY}, data={"x": "1"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    r = httpx.post(server + "/v1/predict", headers={"X-API-Key": KEY, "content-type": "application/json"},
                   content=b"{}")
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    r = httpx.post(server + "/v1/predict", headers={"X-API-Key": KEY,
                                                   "content-type": "multipart/form-data; boundary=zz"},
                   content=b"--zz\r\ngarbage")
    assert r.status_code == 400 and "error" in r.json()
    big = [("files", ("big.jpg", b"\xff" * 2_500_000, "image/jpeg"))]
    r = post(server, "/v1/predict", big)
    assert r.status_code == 413 and "limit of 2 MB" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds for a streamed body too
        yield b"--zz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(30):
            yield b"\0" * 100_000

    r = httpx.post(server + "/v1/predict", content=chunks(),
                   headers={"X-API-Key": KEY, "content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413
    r = post(server, "/v1/localize", multipart(POSITIVES[:2], "file"))
    assert r.status_code == 400 and "exactly one" in r.json()["error"]
    r = post(server, "/v1/localize", [("file", ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))])
    assert r.status_code == 422 and r.json()["error"].startswith("x.png: ")


def test_hostile_images_are_answered_not_crashed_on(server):
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 100 megapixels in a few kB
    assert len(bomb.getvalue()) < 100_000
    truncated = POSITIVES[0].read_bytes()[:3000]
    files = [("files", ("bomb.png", bomb.getvalue(), "image/png")), ("files", ("cut.jpg", truncated, "image/jpeg")),
             ("files", ("../../etc/passwd", b"", "image/jpeg")), ("files", ("ok.jpg", POSITIVES[0].read_bytes(), "image/jpeg"))]
    r = post(server, "/v1/predict", files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert "too large" in res[0]["error"] and "error" in res[1] and res[2] == {"filename": "../../etc/passwd",
                                                                              "error": "empty file"}
    assert res[3]["label"] == "Positive"


def test_full_queue_answers_503(server):
    r = post(server, "/v1/predict", multipart((POSITIVES + NEGATIVES) * 2))  # 12 images, 8 may wait
    assert r.status_code == 503 and "busy" in r.json()["error"] and r.headers["retry-after"] == "1"


def test_concurrent_clients_share_batches_and_agree(server, reference):
    _, rows = reference
    paths = (POSITIVES + NEGATIVES)
    before = httpx.get(server + "/healthz", headers={"X-API-Key": KEY}).json()

    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"X-API-Key": KEY}) as client:
            async def one(p):
                for _ in range(20):  # the 8-image queue may turn some away: retry as the page does
                    r = await client.post(server + "/v1/predict", files=multipart([p]))
                    if r.status_code != 503:
                        return r
                    await asyncio.sleep(0.2)
                return r
            return await asyncio.gather(*(one(p) for p in paths * 3))

    answers = asyncio.run(main())
    assert all(a.status_code == 200 for a in answers)
    for a, p in zip(answers, paths * 3):
        assert a.json()["results"][0]["probability"] == pytest.approx(rows[p].probability, abs=1e-5)
    after = httpx.get(server + "/healthz", headers={"X-API-Key": KEY}).json()
    assert after["images"] - before["images"] == 18
    assert after["batches"] - before["batches"] < 18  # requests were batched together


def test_localize_matches_predict_py_tiling(server, reference, tmp_path):
    from crack_lightning.inference.localize import localize

    predictor, _ = reference
    rng = np.random.default_rng(0)
    photo = np.concatenate([np.asarray(Image.open(p).convert("RGB").resize((300, 300)))
                            for p in (POSITIVES[0], NEGATIVES[0])], axis=1)
    photo = np.clip(photo.astype(int) + rng.integers(-3, 4, photo.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "site.png"
    Image.fromarray(photo).save(path)
    r = post(server, "/v1/localize", [("file", ("site.png", path.read_bytes(), "image/png"))])
    assert r.status_code == 200
    body = r.json()
    expected, _ = localize(path, predictor)
    assert (body["width"], body["height"]) == (600, 300)
    assert [(t["x"], t["y"], t["width"], t["height"]) for t in body["tiles"]] == \
        [(t.x, t.y, t.width, t.height) for t in expected.tiles]
    assert np.allclose([t["probability"] for t in body["tiles"]], [t.probability for t in expected.tiles],
                       atol=1e-5)
    assert body["crack_tiles"] == len(expected.crack_tiles) > 0
    assert body["crack_fraction"] == pytest.approx(expected.crack_fraction(), abs=1e-6)
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heat.mode == "RGBA" and heat.size == (600, 300)
    alpha = np.asarray(heat)[..., 3]
    assert alpha[:, :200].mean() > alpha[:, 400:].mean()  # the veil lies over the cracked half


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the browser test needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    return path


@pytest.mark.slow
def test_page_in_a_real_browser(server, reference, tmp_path):
    """Drop three photos on the page, wait for the table, check the answers, open the viewer."""
    from playwright.sync_api import sync_playwright

    _, rows = reference
    paths = [POSITIVES[0], NEGATIVES[0], POSITIVES[1]]
    payload = [{"name": p.name, "b64": base64.b64encode(p.read_bytes()).decode()} for p in paths]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server + "/")
        page.fill("#api-key", KEY)  # this server wants a key: the page asks for it
        page.click("#key-save")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
        page.evaluate("""(files) => {
            const dt = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], f.name, {type: 'image/jpeg'}));
            }
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }""", payload)
        page.wait_for_function("document.querySelectorAll('#results tbody tr:not(.pending)').length === 3",
                               timeout=60_000)
        table = page.eval_on_selector_all("#results tbody tr", "trs => trs.map(tr => [...tr.cells].map(c => c.textContent))")
        assert [row[1] for row in table] == [p.name for p in paths]
        for row, p in zip(table, paths):
            assert row[3] == p.parent.name == rows[p].label
            assert float(row[2]) == pytest.approx(rows[p].probability, abs=1e-4)
        assert page.text_content("#progress") == "3 of 3 answered, 2 with a crack"
        with page.expect_download() as dl:
            page.click("#csv")
        csv_text = Path(dl.value.path()).read_text()
        assert csv_text.splitlines()[0] == "filename,probability,label,error" and len(csv_text.splitlines()) == 4
        page.click("#results tbody tr:first-child")
        page.wait_for_function("document.getElementById('viewer-status').textContent.includes('tiles show a crack')")
        assert page.eval_on_selector("#heat", "img => img.naturalWidth") == 227
        assert page.locator("#tiles rect").count() == 1
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
        # the API docs render from files the package ships: no request leaves this machine
        docs = browser.new_page()
        asked: list[str] = []
        docs.on("request", lambda r: asked.append(r.url))
        docs.goto(server + "/docs")
        docs.wait_for_selector(".opblock-summary-path[data-path='/v1/predict']", timeout=30_000)
        assert asked and all(url.startswith(server) for url in asked), asked
        browser.close()
    assert Image.open(shot).size == (1100, 800)
