#!/usr/bin/env python
"""Make docs/server_page.png: the page after dropping sample patches, with one photo opened in the viewer
(its answer, its crack tiles, the review marks, its crack map and the table of its cracks in mm).

    python docs/screenshot.py          # needs Debian's chromium (apt-get install chromium)

Starts ``serve.py``, drops eight patches of ``data/sample`` and a 3x2 mosaic "site photo"
made of sample patches (three with a crack), waits for the answers, opens the mosaic.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
sys.path.insert(0, str(ROOT / "tests"))
from conftest import drop_files, launch_chromium  # noqa: E402 - the page driven as the browser tests drive it


def main() -> int:
    pos, neg = sorted((SAMPLE / "Positive").glob("*.jpg")), sorted((SAMPLE / "Negative").glob("*.jpg"))
    files = [p for pair in zip(pos[:4], neg[:4]) for p in pair]
    cells = [np.asarray(Image.open(p).convert("RGB")) for p in (pos[10], neg[10], neg[11], neg[12], pos[11], pos[12])]
    mosaic = Path("/tmp/site_photo.jpg")
    Image.fromarray(np.concatenate([np.concatenate(cells[:3], 1), np.concatenate(cells[3:], 1)], 0)).save(mosaic)
    dropped = [*files, mosaic]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile

    sites = tempfile.mkdtemp(prefix="sites_")  # the review loop on, with no site's marks of earlier runs
    server = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--sites", sites], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            page.goto(url + "/")
            page.wait_for_function("!document.getElementById('site-box').hidden")
            page.fill("#site", "bridge-7")  # an inspector's site: the viewer offers the marks
            page.dispatch_event("#site", "change")
            drop_files(page, dropped)
            page.wait_for_function(f"document.querySelectorAll('#results tbody tr:not(.pending)').length === {len(dropped)}")
            page.click("#results tbody tr:last-child")
            page.wait_for_function("document.getElementById('viewer-status').textContent.includes('tiles')")
            traced = "document.getElementById('crack-status').textContent.includes('traced')"
            page.wait_for_function(traced, timeout=120_000)
            page.fill("#scale", "0.1")
            page.evaluate("document.getElementById('crack-status').textContent = ''")
            page.click("#measure")
            page.wait_for_function(traced, timeout=120_000)
            page.click("#crack-table th[data-key=max_width]")
            page.wait_for_timeout(300)
            out = ROOT / "docs" / "server_page.png"
            page.screenshot(path=str(out))
            browser.close()
        print(f"wrote {out}")
    finally:
        server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
