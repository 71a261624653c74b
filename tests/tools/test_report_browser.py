"""report.html in a real headless Chromium: every image on the page and every linked preview PNG loads.

Chromium (Debian's ``chromium``; ``.ci/run`` installs it) is required under CI (``CI=true``): there a missing
browser fails the test; elsewhere the test is skipped.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from sautomed.cli import main
from sautomed.evaluation.metrics import ClassResult, summarize, write_metrics
from sautomed.evaluation.thumbnails import write_thumbnail

# Appended to a copy of the page: after load, try every <img> and every linked .png, then write the counts.
PROBE = """<script>
window.onload = function () {
  var imgs = Array.prototype.slice.call(document.images);
  var brokenImgs = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                       .map(function (i) { return i.getAttribute('src'); });
  var links = Array.prototype.slice.call(document.querySelectorAll('a[href$=".png"]'))
                   .map(function (a) { return a.getAttribute('href'); });
  Promise.all(links.map(function (href) {
    return new Promise(function (done) {
      var im = new Image();
      im.onload = function () { done(im.naturalWidth > 0 ? null : href); };
      im.onerror = function () { done(href); };
      im.src = href;
    });
  })).then(function (bad) {
    var result = {images: imgs.length, broken_images: brokenImgs, links: links.length,
                  broken_links: bad.filter(function (h) { return h !== null; })};
    var out = document.createElement('pre');
    out.id = 'probe-result';
    out.textContent = JSON.stringify(result);
    document.body.appendChild(out);
    document.title = 'probe-done';
  });
};
</script>
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    message = "headless Chromium not found (no chromium / chromium-browser on PATH): apt-get install chromium"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (required under CI; .ci/run installs it)")
    pytest.skip(message)


def _probe(browser, page, tmp_path) -> dict:
    """Load a copy of ``page`` with PROBE appended (beside it) in headless Chromium; the probe's result."""
    probed = page.with_name("probed_" + page.name)
    probed.write_text(page.read_text() + PROBE)
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probed.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"probe-result\">(.*?)</pre>", proc.stdout, re.S)
    assert proc.returncode == 0 and found, (
        f"chromium gave no probe result (exit {proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
    )
    return json.loads(html.unescape(found.group(1)))


def _report_with_previews(small_phantoms, tmp_path):
    """A report folder whose two cases have real `sautomed preview` PNGs and a third has none."""
    folder = tmp_path / "run"
    folder.mkdir()
    names = ["liver", "kidney"]
    cases = ("phantom_000", "phantom_001", "other")
    rows = [ClassResult(case, name, 0.8, 4.0, "ok") for case in cases for name in names]
    write_metrics(rows, summarize(rows, names), folder)
    for case in ("phantom_000", "phantom_001"):
        image = small_phantoms / "imagesTr" / f"{case}_0000.nii.gz"
        labels = small_phantoms / "labelsTr" / f"{case}.nii.gz"
        out = folder / f"{case}.png"
        assert main(["preview", "--image", str(image), "--labels", str(labels), "--out", str(out)]) == 0
    ref = np.zeros((2, 16, 16), np.uint8)
    ref[1, 4:12, 4:12] = 1
    write_thumbnail(folder, "phantom_000", None, ref, np.roll(ref, 2, axis=2))  # embedded in the page
    assert main(["report", str(folder)]) == 0
    return folder / "report.html"


def test_report_images_and_linked_previews_load_in_chromium(small_phantoms, tmp_path):
    browser = _chromium()  # before any work: fail (CI) or skip at once
    page = _report_with_previews(small_phantoms, tmp_path)
    result = _probe(browser, page, tmp_path)
    assert result["images"] == 1 and result["broken_images"] == [], result  # the embedded thumbnail
    assert result["broken_links"] == [], result
    assert result["links"] == 2, result  # phantom_000 and phantom_001 link their previews; `other` has none


def test_the_probe_sees_a_broken_image(small_phantoms, tmp_path):
    """The check can fail: a missing <img> and a link to a missing PNG are reported as broken."""
    browser = _chromium()  # before any work: fail (CI) or skip at once
    page = _report_with_previews(small_phantoms, tmp_path)
    (page.parent / "phantom_001.png").unlink()  # its link now points nowhere
    text = page.read_text().replace("</body>", "<img src='no_such_image.png'></body>")
    page.write_text(text)
    result = _probe(browser, page, tmp_path)
    assert result["images"] == 2 and result["broken_images"] == ["no_such_image.png"], result
    assert result["broken_links"] == ["phantom_001.png"], result
