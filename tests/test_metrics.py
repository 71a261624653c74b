"""DSC / HD95 against hand-computed cases, the empty-mask policy, and the written table."""

import csv
import json
import math

import numpy as np
import pytest

from sautomed.evaluation.metrics import (
    dice,
    evaluate_case,
    hd95_mm,
    summarize,
    volume_diagonal_mm,
    write_metrics,
)


def test_dice_hand_computed():
    a = np.zeros((1, 4, 4), bool)
    b = np.zeros((1, 4, 4), bool)
    a[0, 0, :2] = True  # 2 voxels
    b[0, 0, 1:4] = True  # 3 voxels, 1 shared
    assert dice(a, b) == pytest.approx(2 * 1 / 5)


def test_identical_masks_give_dsc_1_and_hd95_0():
    m = np.zeros((5, 6, 7), bool)
    m[1:4, 2:5, 3:6] = True
    assert dice(m, m) == 1.0
    assert hd95_mm(m, m, (2.0, 1.0, 1.0)) == 0.0


def test_hd95_uses_anisotropic_spacing():
    # two single voxels 3 slices apart along z: distance 3 * z-spacing, not 3 voxels
    a = np.zeros((8, 4, 4), bool)
    b = np.zeros((8, 4, 4), bool)
    a[1, 2, 2] = True
    b[4, 2, 2] = True
    assert hd95_mm(a, b, (2.5, 0.7, 0.7)) == pytest.approx(7.5)
    # the same shift along x uses the x spacing
    c = np.zeros((8, 4, 4), bool)
    c[1, 2, 0] = True
    assert hd95_mm(a, c, (2.5, 0.7, 0.7)) == pytest.approx(1.4)


def test_one_voxel_objects():
    a = np.zeros((3, 3, 3), bool)
    a[1, 1, 1] = True
    assert dice(a, a) == 1.0
    assert hd95_mm(a, a, (1.0, 1.0, 1.0)) == 0.0


def test_empty_mask_policy_table():
    ref = np.zeros((4, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 2:5, 2:5] = 1  # class 1: present in both
    pred[1:3, 2:5, 2:6] = 1
    ref[0, 7:9, 7:9] = 2  # class 2: missed
    pred[3, 0:2, 0:2] = 3  # class 3: false positive only
    # class 4: absent from both
    spacing = (3.0, 1.0, 0.5)
    rows = evaluate_case("c1", pred, ref, spacing, ["a", "b", "c", "d"])
    by = {r.class_name: r for r in rows}
    assert by["a"].status == "ok" and by["a"].dsc == pytest.approx(2 * 18 / (18 + 24))
    assert by["b"].status == "missed" and by["b"].dsc == 0.0
    assert by["b"].hd95_mm == pytest.approx(math.sqrt((4 * 3.0) ** 2 + (10 * 1.0) ** 2 + (10 * 0.5) ** 2))
    assert by["c"].status == "false_positive" and by["c"].dsc == 0.0 and math.isnan(by["c"].hd95_mm)
    assert by["d"].status == "not_applicable" and math.isnan(by["d"].dsc)
    s = summarize(rows, ["a", "b", "c", "d"])
    # means over what is applicable: DSC over a, b, c; HD95 over a, b
    assert s["mean_dsc"] == pytest.approx((by["a"].dsc + 0 + 0) / 3)
    assert s["mean_hd95_mm"] == pytest.approx((by["a"].hd95_mm + by["b"].hd95_mm) / 2)
    assert math.isnan(s["per_class"]["d"]["dsc"])  # nothing applicable: NaN, never 0
    assert s["missed_cases"] == 1 and s["false_positive_cases"] == 1 and s["num_cases"] == 1


def test_volume_diagonal():
    assert volume_diagonal_mm((2, 3, 6), (1.0, 2.0, 1.0)) == pytest.approx(math.sqrt(4 + 36 + 36))


def test_write_metrics_files(tmp_path):
    ref = np.zeros((2, 5, 5), np.uint8)
    ref[0, 1:3, 1:3] = 1
    rows = evaluate_case("case_a", ref.copy(), ref, (1.0, 1.0, 1.0), ["liver", "spleen"])
    summary = summarize(rows, ["liver", "spleen"])
    write_metrics(rows, summary, tmp_path)
    table = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["class"] for r in table] == ["liver", "spleen"]
    assert table[0]["status"] == "ok" and float(table[0]["dsc"]) == 1.0
    assert table[1]["status"] == "not_applicable" and table[1]["dsc"] == ""
    blob = json.loads((tmp_path / "summary.json").read_text())
    assert blob["mean_dsc"] == 1.0 and blob["per_class"]["spleen"]["dsc"] is None
    assert not list(tmp_path.glob(".*tmp*"))


def test_rows_say_how_an_organ_failed_at_its_ends():
    from sautomed.evaluation.metrics import slices_past_ends

    ref = np.zeros((10, 4, 4), np.uint8)
    ref[2:8, 1:3, 1:3] = 1  # the organ on slices 2..7
    short = ref.copy()
    short[6:8] = 0  # cut two slices short at its lower end
    past = ref.copy()
    past[8:10, 1:3, 1:3] = 1  # carried two slices past it
    assert slices_past_ends(short == 1, ref == 1) == (2, 0)
    assert slices_past_ends(past == 1, ref == 1) == (0, 2)
    assert slices_past_ends(np.zeros_like(ref, bool), ref == 1) == (6, 0)  # missed: all its slices
    rows = evaluate_case("c", short, ref, (1.0, 1.0, 1.0), ["organ"])
    assert (rows[0].status, rows[0].slices_missed, rows[0].slices_beyond) == ("ok", 2, 0)
    summary = summarize(rows + evaluate_case("d", past, ref, (1.0, 1.0, 1.0), ["organ"]), ["organ"])
    organ = summary["per_class"]["organ"]
    assert organ["cut_short_cases"] == 1 and organ["slices_missed_at_ends"] == 2
    assert organ["carried_past_cases"] == 1 and organ["slices_beyond_ends"] == 2
