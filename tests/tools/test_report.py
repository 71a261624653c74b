"""report.html from a metrics folder: every case and class, statuses marked, names escaped."""

from __future__ import annotations

import math
from html.parser import HTMLParser

from sautomed.cli import main
from sautomed.metrics import ClassResult, summarize, write_metrics


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
