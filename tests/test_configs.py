"""Every shipped config parses (a typo in a key or a value reaches no user), as the family it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sautomed.cli import main
from sautomed.families import family_for_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 15


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    assert main(["fit", "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    family, _ = family_for_args(["--config", str(config)])
    model = printed["model"]
    assert model.get("class_path", family.class_path) == family.class_path
    assert printed["trainer"] is not None and printed["data"] is not None


def test_a_typo_in_a_config_is_refused(tmp_path, capsys):
    cfg = yaml.safe_load((CONFIGS[0]).read_text())
    cfg.setdefault("model", {})["no_such_setting"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(bad), "--print_config"]) != 0
    assert "no_such_setting" in capsys.readouterr().err


def test_short_config_flag_picks_the_configs_family():
    msam = next(c for c in CONFIGS if c.name == "msam_brats.yaml")
    assert family_for_args(["-c", str(msam)])[0].name == "msam"
    assert family_for_args([f"-c={msam}"])[0].name == "msam"
    assert family_for_args(["--config", str(msam)])[0].name == "msam"
