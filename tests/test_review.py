"""The inspector's review loop: marks on a site's photos refit the site's model, in the API and the page."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, drop_files, launch_chromium, run_main, start_server
from fastapi.testclient import TestClient
from PIL import Image

NEG = sorted((SAMPLE / "Negative").glob("*.jpg"))
POS = sorted((SAMPLE / "Positive").glob("*.jpg"))


def mosaic(patches) -> bytes:
    """A 454x454 "photo": three crack-free patches and one crack patch (the site's joint, say)."""
    a = [np.asarray(Image.open(p).convert("RGB")) for p in patches]
    buf = io.BytesIO()
    Image.fromarray(np.vstack([np.hstack(a[:2]), np.hstack(a[2:])])).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("site")
    paths = [folder / "wall_a.png", folder / "wall_b.png"]
    paths[0].write_bytes(mosaic([NEG[0], NEG[1], NEG[2], POS[0]]))
    paths[1].write_bytes(mosaic([NEG[3], POS[1], NEG[4], NEG[5]]))
    return paths


def test_marks_refit_the_site_and_are_logged(photos, tmp_path):
    """A tile mark and a photo mark, through the API: the site's answers change, the server's do not; the
    profile lists, logs who/when/what, exports and resets; a bad site name or tile is a 400."""
    from crack_lightning.inference.predictor import Predictor
    from crack_lightning.serve.app import create_app

    app = create_app(Predictor(num_workers=0), sites=tmp_path / "sites")
    up = lambda p: [("file", (p.name, p.read_bytes(), "image/png"))]  # noqa: E731
    with TestClient(app) as c:
        loc = c.post("/v1/localize", files=up(photos[0])).json()
        assert loc["label"] == "Positive" and loc["crack_tiles"] > 0
        tile = max(loc["tiles"], key=lambda t: t["probability"])
        box = {k: tile[k] for k in ("x", "y", "width", "height")}
        r = c.post("/v1/sites/bridge-7/marks", params={"label": "no crack", "who": "ann", **box}, files=up(photos[0]))
        assert r.status_code == 200 and r.json()["marks"] == 1 and r.json()["threshold"] > loc["threshold"]
        from crack_lightning.models.runtime import cache_dir, file_key

        site_file = tmp_path / "sites" / "bridge-7" / "model.pt"  # its export is ready: the next request exports nothing
        assert (cache_dir() / f"{file_key(site_file, 'probability', 224)}.onnx").is_file()
        after = c.post("/v1/localize", params={"site": "bridge-7"}, files=up(photos[0])).json()
        marked = next(t for t in after["tiles"] if all(t[k] == box[k] for k in box))
        assert marked["probability"] < after["threshold"]  # the marked tile is silenced
        import crack_lightning.inference.sites as sites_module

        limit = sites_module.SITE_MAX_FEATURES
        sites_module.SITE_MAX_FEATURES = 50  # a photo mark stores 80 tiles (224 + 112 px) of this 454 px photo
        try:
            full = c.post("/v1/sites/bridge-7/marks", params={"label": "no crack"}, files=up(photos[1]))
            assert full.status_code == 400 and "holds 1 marked tiles; at most 50" in full.json()["error"]
        finally:
            sites_module.SITE_MAX_FEATURES = limit
        c.post("/v1/sites/bridge-7/marks", params={"label": "no crack", "who": "bob"}, files=up(photos[1]))
        crack = c.post("/v1/sites/bridge-7/marks", params={"label": "crack", "who": "bob"}, files=up(photos[0]))
        assert crack.json()["crack_marks"] == 1  # a whole photo marked crack: its 4 most crack-like tiles
        assert c.post("/v1/predict", params={"site": "bridge-7"}, files=[("files", f[1]) for f in up(photos[1])]
                      ).json()["results"][0]["label"] == "Negative"
        assert c.post("/v1/predict", files=[("files", f[1]) for f in up(photos[1])]
                      ).json()["results"][0]["label"] == "Positive"  # without the site: the server's own model
        profile = c.get("/v1/sites/bridge-7").json()
        assert [(e["event"], e.get("who")) for e in profile["log"]] == \
            [("mark", "ann"), ("refit", "ann"), ("mark", "bob"), ("refit", "bob"), ("mark", "bob"), ("refit", "bob")]
        assert profile["log"][4]["features"] == 4 and profile["tiles"] == 1 + 80 + 4
        assert profile["log"][0]["tile"] == list(box.values()) and profile["log"][2]["photo"] == "wall_b.png"
        assert [s["site"] for s in c.get("/v1/sites").json()["sites"]] == ["bridge-7"]
        assert c.get("/v1/sites/bridge-7/model").content[:2] == b"PK"  # a torch file
        bad = c.post("/v1/sites/a%20b/marks", params={"label": "crack"}, files=up(photos[0]))
        assert bad.status_code == 400 and "site names" in bad.json()["error"]
        bad = c.post("/v1/sites/s/marks", params={"label": "crack", "x": 400, "y": 0, "width": 100, "height": 100},
                     files=up(photos[0]))
        assert bad.status_code == 400 and "not inside" in bad.json()["error"]
        assert c.delete("/v1/sites/bridge-7", params={"who": "ann"}).json()["marks"] == 0
        assert c.get("/v1/sites/bridge-7").json()["log"][-1]["event"] == "reset"
        assert c.get("/v1/sites/bridge-7/model").status_code == 404


def page_answers(browser, url: str, photos: list[Path], marks: bool = False) -> list[list[str]]:
    """Open the page on site bridge-7, drop the photos, (with ``marks``: mark each as no crack in the
    viewer), and return the table's rows as the page's CSV download writes them."""  # noqa: D401
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
    page.fill("#site", "bridge-7")
    page.dispatch_event("#site", "change")
    drop_files(page, photos)
    page.wait_for_function("document.querySelectorAll('#results tbody tr:not(.pending)').length === 2", timeout=60_000)
    if marks:
        assert page.text_content("#progress") == "2 of 2 answered, 2 with a crack"  # two false alarms
        for n in (1, 2):
            page.click(f"#results tbody tr:nth-child({n})")
            page.wait_for_function("!document.getElementById('review').hidden")
            page.click("#mark-clean")
            page.wait_for_function(f"document.getElementById('review-status').textContent.startsWith('learned: {n} mark')",
                                   timeout=60_000)
            page.click("#close")
        page.wait_for_function("document.getElementById('progress').textContent.endsWith(', 0 with a crack')")
    with page.expect_download() as dl:
        page.click("#csv")
    rows = list(csv.reader(io.StringIO(Path(dl.value.path()).read_text())))[1:]
    page.close()
    return rows


@pytest.mark.slow
def test_page_review_loop_survives_a_restart_and_exports(photos, tmp_path):
    """Mark two false alarms on a site in the browser, see them cleared; restart the server: the site still
    clears them; the site's exported model gives predict.py the same rows."""
    from playwright.sync_api import sync_playwright

    sites = tmp_path / "sites"
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        proc, url = start_server("--sites", str(sites), "--segment-checkpoint", "none")
        try:
            rows = page_answers(browser, url, photos, marks=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        browser.close()
    assert [r[2] for r in rows] == ["Negative", "Negative"]
    from crack_lightning.inference.predictor import Predictor
    from crack_lightning.serve.app import create_app

    with TestClient(create_app(Predictor(num_workers=0), sites=sites)) as c:  # a new server on the same --sites
        again = c.post("/v1/predict", params={"site": "bridge-7"},
                       files=[("files", (p.name, p.read_bytes(), "image/png")) for p in photos]).json()["results"]
        model = tmp_path / "bridge-7.pt"
        model.write_bytes(c.get("/v1/sites/bridge-7/model").content)
    assert [[a["filename"], f"{a['probability']:.6f}", a["label"]] for a in again] == [r[:3] for r in rows]
    assert run_main("predict.py", "--model", str(model), *map(str, photos), "--output",
                    str(tmp_path / "p.csv")).returncode == 0
    exported = [[Path(r["path"]).name, r["probability"], r["label"]] for r in csv.DictReader(open(tmp_path / "p.csv"))]
    assert exported == [r[:3] for r in rows]
