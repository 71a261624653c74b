"""What a command prints is about the run: no Lightning warning or advertising on a default fit / test."""

from __future__ import annotations

import logging
import warnings

from sautomed.cli import main


def _lightning_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.filename}: {w.message}" for w in record if "lightning" in w.filename]


def _python_default_filters() -> None:
    """The warning filters a user's `sautomed` process starts with (pytest's show deprecations)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)


def test_a_tiny_fit_and_test_print_no_lightning_warning(tiny_phantoms, tmp_path, make_config, capsys, caplog):
    run = tmp_path / "run"
    cfg = make_config(tmp_path / "tiny.yaml", tiny_phantoms, run)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as record:
        _python_default_filters()
        assert main(["fit", "--config", str(cfg)]) == 0
        assert main(["test", "--config", str(cfg), "--ckpt_path", str(run / "last.ckpt")]) == 0
    assert _lightning_warnings(record) == []
    printed = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records]
    assert not any("Tip" in line for line in [*logged, *printed.out.splitlines(), *printed.err.splitlines()])
    assert not any("earlier run" in line for line in logged)
    assert (run / "lightning_logs" / "version_0" / "metrics.csv").is_file()  # the CSV logger, as before

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sautomed"):
        assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "1"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if "earlier run" in r.getMessage()]
    assert "last.ckpt" in line and "--ckpt_path last" in line
