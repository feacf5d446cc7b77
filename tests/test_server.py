"""The HTTP API through the real server (``serve.py`` in its own process), and the page in a real browser."""
from __future__ import annotations

import asyncio
import base64
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, SAMPLE, drop_files, launch_chromium, start_server
from PIL import Image

KEY = "s3cret"
POSITIVES = sorted((SAMPLE / "Positive").glob("*.jpg"))[:3]
NEGATIVES = sorted((SAMPLE / "Negative").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def server():
    """One server for the module: API key required, 2 MB uploads, 8 images queued at most."""
    proc, url = start_server("--api-key", KEY, "--max-upload-mb", "2", "--max-queue", "8", "--segment-checkpoint", "none")
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
    assert h["status"] == "ok" and h["model"].startswith("site (crack_lite0.pt") and 0 < h["threshold"] < 1
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
    assert body["model"] == predictor.name and body["threshold"] == pytest.approx(predictor.threshold)
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


def test_a_request_as_large_as_the_queue_is_answered(server, reference):
    r = post(server, "/v1/predict", multipart(POSITIVES + NEGATIVES + POSITIVES[:2]))  # 8 images, 8 may wait
    assert r.status_code == 200 and len(r.json()["results"]) == 8


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
    expected, _ = localize(path, predictor.photos)  # a photo: the photo model's tiles at 224 and 112 px
    row = next(predictor.iter_rows([path]))  # ... and predict.py's answer for it is theirs
    assert (body["label"], body["probability"]) == (row.label, pytest.approx(row.probability, abs=1e-6))
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


@pytest.mark.slow
def test_page_in_a_real_browser(server, reference, tmp_path):
    """Drop three photos on the page, wait for the table, check the answers, open the viewer."""
    from playwright.sync_api import sync_playwright

    _, rows = reference
    paths = [POSITIVES[0], NEGATIVES[0], POSITIVES[1]]
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server + "/")
        page.fill("#api-key", KEY)  # this server wants a key: the page asks for it
        page.click("#key-save")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
        drop_files(page, paths)
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
        status = page.text_content("#viewer-status")  # the viewer's answer is the table's
        assert status.startswith(f"{table[0][3]} ({table[0][2]}): ")
        assert page.locator("#tiles rect").count() == int(status.split(": ")[1].split(" of ")[0])
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


# ---- hostile input, round 3: every request's work is bounded before it starts, and called off -----------
def test_a_request_that_could_never_fit_is_413_and_every_error_has_one_shape(server):
    """More images than the queue holds is not 'busy' (a client obeying Retry-After would loop forever):
    413. Unknown routes and wrong methods answer in the documented {"error": ...} shape."""
    r = post(server, "/v1/predict", multipart(POSITIVES * 3))  # 9 images, the queue holds 8
    assert r.status_code == 413 and "at most 8" in r.json()["error"] and "retry-after" not in r.headers
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/predict", 405), ("DELETE", "/healthz", 405)):
        r = httpx.request(method, server + path, headers={"X-API-Key": KEY})
        assert r.status_code == status and set(r.json()) == {"error"}, r.text


def test_localize_work_is_bounded_before_it_starts(server, tmp_path):
    """tile=32 & stride=1 on a 2500x2500 photo would be ~6 million tiles: refused at once, naming the
    limit, and the server answers the next request as before."""
    big = tmp_path / "big.png"
    Image.new("RGB", (2500, 2500), (128, 128, 128)).save(big)
    t0 = time.perf_counter()
    r = post(server, "/v1/localize?tile=32&stride=1", [("file", ("big.png", big.read_bytes(), "image/png"))])
    assert r.status_code == 400 and "tiles" in r.json()["error"] and "20,000" in r.json()["error"]
    assert time.perf_counter() - t0 < 20
    for query in ("tile=10", "tile=32&stride=-1", "tile=99999"):
        assert post(server, f"/v1/localize?{query}", [("file", ("a.jpg", POSITIVES[0].read_bytes()))]).status_code == 400
    assert post(server, "/v1/predict", multipart(POSITIVES[:1])).status_code == 200


def test_a_non_ascii_api_key_is_refused_not_a_server_error(server):
    r = httpx.post(server + "/v1/predict", files=multipart(POSITIVES[:1]), headers=[(b"X-API-Key", b"cl\xc3\xa9")])
    assert r.status_code == 401 and "X-API-Key" in r.json()["error"]


@pytest.mark.slow
def test_work_is_called_off_when_its_client_leaves_and_sigterm_stops_the_server(tmp_path):
    """A long /v1/localize whose client gives up stops at its next batch: the next request is answered in
    seconds, not after the abandoned photo. SIGTERM during such work ends the server within seconds."""
    photo = tmp_path / "wall.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(100, 160, (1200, 1200, 3), dtype=np.uint8)).save(photo)
    files = [("file", ("wall.png", photo.read_bytes(), "image/png"))]
    proc, url = start_server("--segment-checkpoint", "none")
    try:
        with pytest.raises(httpx.TimeoutException):  # ~5,000 tiles: minutes of work, the client leaves after 2 s
            httpx.post(url + "/v1/localize?tile=64&stride=16", files=files, timeout=2)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/predict", files=multipart(POSITIVES[:1]), timeout=60)
        assert r.status_code == 200 and time.perf_counter() - t0 < 15
        client = subprocess.Popen([sys.executable, "-c", "import httpx, sys; httpx.post(sys.argv[1], files="
                                   "{'file': open(sys.argv[2], 'rb')}, timeout=600)",
                                   url + "/v1/localize?tile=64&stride=16", str(photo)])
        time.sleep(2)  # the work is running
        t0 = time.perf_counter()
        proc.terminate()
        proc.wait(timeout=20)
        assert time.perf_counter() - t0 < 12
        client.kill()
    finally:
        proc.kill()


def test_serve_refuses_bad_options_in_one_line_before_loading_anything():
    """NaN limits, a non-ASCII key and a port already in use: one line, exit 2, nothing announced."""
    for args, expected in ((["--max-upload-mb", "nan"], "--max-upload-mb"), (["--max-queue", "0"], "--max-queue"),
                           (["--api-key", "clé"], "printable ASCII")):
        res = subprocess.run([sys.executable, "serve.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr, res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        res = subprocess.run([sys.executable, "serve.py", "--port", str(busy.getsockname()[1])], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "cannot listen on" in res.stderr and "Traceback" not in res.stderr
    assert "open http" not in res.stdout
