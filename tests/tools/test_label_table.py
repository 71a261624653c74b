"""labels.json: one colour table, kept for the same model, refused for another, read in three formats."""

from __future__ import annotations

import json

import pytest

from sautomed.tools.labels import (
    COLOURS,
    LabelTableError,
    colour,
    label_table,
    read_label_names,
    write_label_table,
)


def test_same_checkpoint_bytes_elsewhere_keep_the_table_another_is_refused(tmp_path):
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"weights")
    moved = tmp_path / "moved" / "a.ckpt"
    moved.parent.mkdir()
    moved.write_bytes(b"weights")
    out = tmp_path / "out"
    path = write_label_table(out, label_table(["liver", "spleen"], ckpt))
    before = path.read_text()
    write_label_table(out, label_table(["liver", "spleen"], moved))  # same bytes: kept as it was
    assert path.read_text() == before
    ckpt.write_bytes(b"other weights")
    with pytest.raises(LabelTableError, match="another model"):
        write_label_table(out, label_table(["liver", "spleen"], ckpt))
    with pytest.raises(LabelTableError, match="another model"):
        write_label_table(out, label_table(["spleen", "liver"], moved))
    write_label_table(out, label_table(["spleen", "liver"], moved), overwrite=True)
    assert json.loads(path.read_text())["labels"]["1"]["name"] == "spleen"


def test_colours_are_fixed_distinct_and_cycle():
    assert colour(0) == (0, 0, 0) and colour(1) == COLOURS[0] and colour(21) == COLOURS[0]
    assert len(set(COLOURS)) == len(COLOURS)


def test_label_names_from_ours_flat_and_nnunet_tables(tmp_path):
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps(label_table(["liver", "spleen"])))
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"0": "background", "1": "liver", "2": "spleen"}))
    nnunet = tmp_path / "dataset.json"
    nnunet.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    for path in (ours, flat, nnunet):
        assert read_label_names(path) == {1: "liver", 2: "spleen"}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LabelTableError, match="bad.json"):
        read_label_names(bad)
