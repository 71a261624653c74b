"""report.html from a metrics folder: every case and class, statuses marked, names escaped."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest

from sautomed.cli import main
from sautomed.evaluation.metrics import ClassResult, summarize, write_metrics


class Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str]] = []  # (class attribute, text)
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self._open = dict(attrs).get("class", "")
            self.cells.append((self._open, ""))

    def handle_data(self, data):
        if self._open is not None:
            cls, text = self.cells[-1]
            self.cells[-1] = (cls, text + data)

    def handle_endtag(self, tag):
        if tag == "td":
            self._open = None


def test_report_lists_cases_classes_and_statuses(tmp_path, capsys):
    names = ["liver", "<b>kidney</b>"]
    rows = [
        ClassResult("case_a", "liver", 0.91234, 3.5, "ok"),
        ClassResult("case_a", "<b>kidney</b>", 0.0, 400.0, "missed"),
        ClassResult("case_b", "liver", 0.0, math.nan, "false_positive"),
        ClassResult("case_b", "<b>kidney</b>", math.nan, math.nan, "not_applicable"),
    ]
    summary = summarize(rows, names)
    summary["missing_predictions"] = ["case_b"]
    write_metrics(rows, summary, tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.html").read_text()
    assert "<b>kidney</b>" not in text and "&lt;b&gt;kidney&lt;/b&gt;" in text  # escaped
    parser = Cells()
    parser.feed(text)
    statuses = [cls for cls, _ in parser.cells if cls in ("ok", "missed", "false_positive", "not_applicable")]
    assert sorted(statuses) == ["false_positive", "missed", "not_applicable", "ok"]
    assert any(t.startswith("0.912 / 3.5") for cls, t in parser.cells if cls == "ok")
    assert "case_a" in text and "case_b" in text and "Cases without a prediction" in text


def test_report_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no metrics" in err and str(tmp_path) in err


def test_sautomed_test_writes_report_html_beside_its_metrics(untrained_ckpt, small_phantoms, tmp_path):
    import yaml

    run = tmp_path / "run"
    cfg = {
        "trainer": {
            "default_root_dir": str(run),
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        },
        "model": {
            "network": {
                "backbone": "tiny",
                "image_size": 32,
                "num_classes": 5,
                "box_decoder_ffn_dim": 64,
                "encoder_finetune": "full",
            }
        },
        "data": {
            "layout": "nnunet",
            "root": str(small_phantoms),
            "folds": 2,
            "preprocessing": {"image_size": 32, "normalization": "ct"},
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["test", "--config", str(path), "--ckpt_path", str(untrained_ckpt)]) == 0
    text = (run / "report.html").read_text()
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        assert case in text
    assert str(untrained_ckpt) in text  # the summary's checkpoint heads the page
    # each case's thumbnail of reference | prediction, written by the evaluation, embedded in the page
    thumbs = sorted(p.stem for p in (run / "thumbnails").glob("*.png"))
    assert thumbs == ["phantom_000", "phantom_001", "phantom_002"]
    assert text.count("src='data:image/png;base64,") == 3


def test_report_orders_cases_worst_first_and_draws_the_training_curves(tmp_path):
    import base64

    import numpy as np

    from sautomed.evaluation.thumbnails import write_thumbnail

    names = ["liver", "kidney"]
    rows = [
        ClassResult("good", "liver", 0.9, 2.0, "ok"),
        ClassResult("good", "kidney", 0.8, 3.0, "ok"),
        ClassResult("bad", "liver", 0.5, 9.0, "ok"),
        ClassResult("bad", "kidney", 0.0, math.nan, "missed"),
        ClassResult("mid", "liver", 0.7, 4.0, "ok"),
        ClassResult("mid", "kidney", math.nan, math.nan, "not_applicable"),
    ]
    write_metrics(rows, summarize(rows, names), tmp_path)
    ref = np.zeros((3, 20, 30), np.uint8)
    ref[1, 5:10, 5:20] = 1
    pred = np.zeros_like(ref)
    pred[1, 6:10, 5:15] = 1
    out = write_thumbnail(tmp_path, "bad", np.random.default_rng(0).random((3, 10, 15)), ref, pred)
    log = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text(
        "epoch,step,train/loss,val/mean_dsc\n0,9,2.0,\n0,19,1.5,\n0,19,,0.4\n1,29,1.0,\n1,29,,0.6\n"
    )
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.html").read_text()
    assert text.index(">bad<") < text.index(">mid<") < text.index(">good<")  # 0.25, 0.7, 0.85
    embedded = base64.b64encode(out.read_bytes()).decode("ascii")
    assert embedded in text and text.count("data:image/png;base64,") == 1  # only `bad` has one
    assert "training loss" in text and "validation mean DSC" in text
    assert text.count("<polyline") == 2


def test_lines_svg_draws_each_series_where_its_points_lie():
    import xml.etree.ElementTree as ET

    from sautomed.tools.curves import lines_svg

    svg = lines_svg(
        {"SAM <path>": [(1, 0.5), (3, 0.9), (2, 0.7)], "U-Net": [(1, 0.2), (3, 0.8)]},
        "DSC by training cases",
        "training cases",
        "mean DSC",
        (0.0, 1.0),
    )
    root = ET.fromstring(svg)  # well-formed, names escaped
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 2
    first = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
    assert [x for x, _ in first] == sorted(x for x, _ in first)  # points drawn in x order
    ys = [y for _, y in first]
    assert ys[0] > ys[1] > ys[2]  # a higher DSC is drawn higher (smaller SVG y)
    assert "SAM &lt;path&gt;" in svg
    with pytest.raises(ValueError):
        lines_svg({}, "t", "x", "y")
