from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from sautomed.data.io import VolumeError, read_volume
from sautomed.data.layouts import LAYOUTS, DatasetError, Layout, get_layout


def liver_like(image: np.ndarray, mask: np.ndarray) -> bool:
    """Liver voxels of a contrast CT: mean 100-200 HU and at least 95% of them within 60-220 HU."""
    values = image[mask]
    return bool(
        values.size and 100 <= values.mean() <= 200 and ((values > 60) & (values < 220)).mean() >= 0.95
    )


# ------------------------------------------------------------------------------------------ real data


def test_btcv_real_ct_with_label_map(shared):
    layout = get_layout("btcv", shared / "real-ct", shared / "real-ct" / "btcv8_label_map.json")
    assert layout.class_names == (
        "spleen",
        "right_kidney",
        "left_kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    )
    (case,) = layout.cases()
    assert case.image.name == "ct.nii.gz" and case.label.name == "totalseg_labels.nii.gz"
    loaded = layout.load(case)
    assert loaded.image.dtype == np.float32 and loaded.label.dtype == np.uint8
    assert loaded.image.shape == loaded.label.shape == (30, 101, 122)
    counts = np.bincount(loaded.label.ravel(), minlength=9)[1:].tolist()
    assert counts == [9452, 3947, 3676, 1333, 38634, 4675, 997, 644]


def test_chaos_ct_png_matching(shared):
    layout = get_layout("chaos", shared / "chaos-ct")
    assert layout.modality == "CT" and layout.class_names == ("liver",)
    (case,) = layout.cases()
    loaded = layout.load(case)
    image, liver = loaded.image, loaded.label == 1
    assert image.shape == (78, 512, 512) and liver.sum() == 1342595
    mean = float(image[liver].mean())
    assert 130 < mean < 150  # measured 141 HU
    assert liver_like(image, liver)
    # the check rejects a reversed, shifted or flipped stack
    assert not liver_like(image, liver[::-1])
    for shift in (-3, -2, 2, 3):
        assert not liver_like(image, np.roll(liver, shift, axis=0)), shift
    assert not liver_like(image, liver[:, ::-1]) and not liver_like(image, liver[:, :, ::-1])
    # canonical z is superior-up: the PNG numbered 000 (instance 1, the top slice) is the last canonical slice
    assert not liver[-1].any() and liver[-8].any() and liver[0].any()


@pytest.mark.parametrize("sub", ["", "Train_Sets", "Train_Sets/CT", "Train_Sets/CT/1"])
def test_chaos_root_levels(shared, sub):
    layout = get_layout("chaos", shared / "chaos-ct" / sub)
    (case,) = layout.cases()
    assert case.case_id == "1" and case.image.name == "DICOM_anon" and case.label.name == "Ground"


def test_nnunet_chaos_mr_float_labels(shared):
    layout = get_layout("nnunet", shared / "chaos-mr")
    assert layout.class_names == ("liver", "right_kidney", "left_kidney", "spleen")
    cases = layout.cases()
    assert [c.case_id for c in cases] == ["chaosmr_001", "chaosmr_002", "chaosmr_003", "chaosmr_005"]
    loaded = layout.load(cases[0])
    assert loaded.label.dtype == np.uint8 and set(np.unique(loaded.label)) == {0, 1, 2, 3, 4}
    assert loaded.image.shape == (37, 256, 256) and loaded.geom.spacing_zyx == pytest.approx(
        (7.7, 1.25, 1.25)
    )


def test_segthor_real(shared):
    for root in (
        shared / "segthor",
        shared / "segthor" / "train",
        shared / "segthor" / "train" / "Patient_01",
    ):
        layout = get_layout("segthor", root)
        (case,) = layout.cases()
        assert case.case_id == "Patient_01" and case.label.name == "GT.nii.gz"
    loaded = layout.load(case)
    assert layout.class_names == ("esophagus", "heart", "trachea", "aorta")
    assert loaded.image.shape == (229, 256, 256) and set(np.unique(loaded.label)) == {0, 1, 2, 3, 4}


def test_folder_real(shared):
    layout = get_layout("folder", shared / "chaos-ct" / "Train_Sets" / "CT" / "1")
    (case,) = layout.cases()  # the DICOM series sub-folder; the Ground PNG folder is ignored
    assert case.case_id == "DICOM_anon" and case.label is None
    assert layout.load(case).label is None


# ------------------------------------------------------------------------------------- synthetic data


def test_btcv_synthetic(tmp_path, stored_writer):
    labels = np.arange(14, dtype=np.uint8).repeat(2).reshape(1, 4, 7)  # every BTCV organ
    for cid in ("0001", "0002"):
        stored_writer(tmp_path / "img" / f"img{cid}.nii.gz", np.zeros((1, 4, 7), np.int16))
        stored_writer(tmp_path / "label" / f"label{cid}.nii.gz", labels)
    layout = get_layout("btcv", tmp_path)
    cases = layout.cases()
    assert [c.case_id for c in cases] == ["0001", "0002"]
    mapped = layout.load(cases[0]).label
    expected = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0, 11: 8, 12: 0, 13: 0}
    assert np.array_equal(mapped, np.vectorize(expected.get)(labels).astype(np.uint8))
    # an image without label is reported, not dropped
    stored_writer(tmp_path / "img" / "img0003.nii.gz", np.zeros((1, 4, 7), np.int16))
    assert [o.case_id for o in layout.orphans()] == ["0003"]
    with pytest.raises(DatasetError, match="0003.*image without label"):
        layout.cases()
    # a value that is not a BTCV organ is an error
    stored_writer(tmp_path / "label" / "label0003.nii.gz", np.full((1, 4, 7), 20, np.uint8))
    with pytest.raises(VolumeError, match="label0003.*20"):
        layout.load(layout.cases()[2])


def test_btcv_test_set_without_labels(tmp_path, stored_writer):
    stored_writer(tmp_path / "img" / "img0061.nii.gz", np.zeros((2, 3, 4), np.int16))
    (case,) = get_layout("btcv", tmp_path).cases()
    assert case.case_id == "0061" and case.label is None


def test_btcv_folder_needs_a_pair(tmp_path, stored_writer):
    stored_writer(tmp_path / "a.nii.gz", np.zeros((2, 3, 4), np.int16))
    stored_writer(tmp_path / "b.nii.gz", np.zeros((2, 3, 4), np.int16))
    with pytest.raises(DatasetError, match="img/ and label/"):
        get_layout("btcv", tmp_path).cases()


def write_png_case(patient, dicom_writer, volume, masks, mr=False, order=None):
    """A CHAOS patient folder; DICOM slice k has instance number order[k] and its PNG that number - 1."""
    n = volume.shape[0]
    order = list(order if order is not None else range(1, n + 1))
    base = patient / "T2SPIR" if mr else patient
    names = [f"IMG-0001-{i:05d}.dcm" for i in np.random.default_rng(0).permutation(n)]  # names unrelated
    dicom_writer(base / "DICOM_anon", volume, instance_numbers=order, names=names)
    (base / "Ground").mkdir(parents=True)
    for k in range(n):
        Image.fromarray(masks[k]).save(base / "Ground" / f"liver_GT_{order[k] - 1:03d}.png")


def test_chaos_matches_png_by_instance_number(tmp_path, dicom_writer):
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 50, (5, 6, 7)).astype(np.int16)  # z increasing towards superior
    masks = np.zeros((5, 6, 7), np.uint8)
    for k in range(5):
        masks[k, k % 6, : k + 1] = 255  # a different mask per slice
    order = [5, 3, 1, 2, 4]  # instance numbers unrelated to position and to file names
    write_png_case(tmp_path / "CT" / "7", dicom_writer, volume, masks, order=order)
    layout = get_layout("chaos", tmp_path)
    loaded = layout.load(layout.cases()[0])
    assert np.array_equal(loaded.image, volume)
    assert np.array_equal(loaded.label, (masks > 0).astype(np.uint8))


def test_chaos_mr_values(tmp_path, dicom_writer):
    volume = np.zeros((2, 4, 4), np.int16)
    masks = np.array([[[0, 63, 126, 189], [252, 60, 130, 200]] * 2] * 2, np.uint8)
    write_png_case(tmp_path / "MR" / "3", dicom_writer, volume, masks, mr=True)
    layout = get_layout("chaos", tmp_path / "MR")
    assert layout.modality == "MR" and layout.class_names == (
        "liver",
        "right_kidney",
        "left_kidney",
        "spleen",
    )
    label = layout.load(layout.cases()[0]).label
    assert label[0, 0].tolist() == [0, 1, 2, 3] and label[0, 1].tolist() == [4, 1, 2, 3]
    # a root with both CT and MR patients is refused
    write_png_case(tmp_path / "CT" / "1", dicom_writer, volume, masks)
    with pytest.raises(DatasetError, match="both CT and MR"):
        get_layout("chaos", tmp_path)


def test_chaos_png_count_mismatch(tmp_path, dicom_writer):
    volume = np.zeros((3, 4, 4), np.int16)
    write_png_case(tmp_path / "2", dicom_writer, volume, np.zeros((3, 4, 4), np.uint8))
    (tmp_path / "2" / "Ground" / "liver_GT_001.png").unlink()
    layout = get_layout("chaos", tmp_path / "2")
    with pytest.raises(VolumeError, match="2 PNG masks for 3 DICOM slices"):
        layout.load(layout.cases()[0])


def test_segthor_test_set(tmp_path, stored_writer):
    for pid in ("Patient_41", "Patient_42"):
        stored_writer(tmp_path / pid / f"{pid}.nii.gz", np.zeros((2, 3, 4), np.uint8))
    cases = get_layout("segthor", tmp_path).cases()
    assert [c.case_id for c in cases] == ["Patient_41", "Patient_42"] and all(c.label is None for c in cases)
    stored_writer(tmp_path / "Patient_41" / "GT.nii.gz", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(DatasetError, match="Patient_42"):
        get_layout("segthor", tmp_path).cases()


def write_nnunet(root, stored_writer, labels, cases=("a", "b"), msd=False, label_values=(0, 1, 2)):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    for cid in cases:
        name = f"{cid}.nii.gz" if msd else f"{cid}_0000.nii.gz"
        stored_writer(root / "imagesTr" / name, np.zeros((1, 1, 3), np.float32))
        stored_writer(root / "labelsTr" / f"{cid}.nii.gz", np.array(label_values, np.uint8).reshape(1, 1, 3))
    return root


def test_nnunet_styles(tmp_path, stored_writer):
    v2 = write_nnunet(tmp_path / "v2", stored_writer, {"background": 0, "kidney": 1, "tumor": 2})
    assert get_layout("nnunet", v2).class_names == ("kidney", "tumor")
    msd = write_nnunet(
        tmp_path / "msd", stored_writer, {"0": "background", "1": "liver", "2": "tumour"}, msd=True
    )
    layout = get_layout("nnunet", msd)
    assert layout.class_names == ("liver", "tumour") and [c.case_id for c in layout.cases()] == ["a", "b"]
    gaps = write_nnunet(
        tmp_path / "gaps", stored_writer, {"background": 0, "x": 2, "y": 5}, label_values=(0, 2, 5)
    )
    layout = get_layout("nnunet", gaps)
    assert layout.class_names == ("x", "y")
    assert layout.load(layout.cases()[0]).label.ravel().tolist() == [0, 1, 2]
    undeclared = write_nnunet(
        tmp_path / "undeclared", stored_writer, {"background": 0, "x": 1}, label_values=(0, 1, 3)
    )
    layout = get_layout("nnunet", undeclared)
    with pytest.raises(VolumeError, match=r"labelsTr/a\.nii\.gz.*\[3\]"):
        layout.load(layout.cases()[0])


def test_nnunet_errors_name_files(tmp_path, stored_writer):
    root = write_nnunet(tmp_path / "ds", stored_writer, {"background": 0, "x": 1})
    (root / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"b: nnunet image without label.*b_0000\.nii\.gz"):
        get_layout("nnunet", root).cases()
    spec = {
        "labels": {"0": "background", "1": "x"},
        "training": [
            {"image": "./imagesTr/a_0000.nii.gz", "label": "./labelsTr/a.nii.gz"},
            {"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"},
        ],
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=r"named in dataset.json but missing.*c\.nii\.gz"):
        get_layout("nnunet", root).cases()
    with pytest.raises(DatasetError, match="dataset.json"):
        get_layout("nnunet", tmp_path)


def test_folder_layout(tmp_path, stored_writer, dicom_writer):
    stored_writer(tmp_path / "b.nii.gz", np.zeros((1, 2, 3), np.int16))
    stored_writer(tmp_path / "a.mha", np.zeros((1, 2, 3), np.int16))
    dicom_writer(tmp_path / "series", np.zeros((2, 4, 4), np.int16))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "empty_dir").mkdir()
    layout = get_layout("folder", tmp_path)
    assert [c.case_id for c in layout.cases()] == ["a", "b", "series"]
    assert layout.load(layout.cases()[2]).image.shape == (2, 4, 4)
    stored_writer(tmp_path / "a.nii.gz", np.zeros((1, 2, 3), np.int16))
    with pytest.raises(DatasetError, match="duplicate case id 'a'"):
        layout.cases()


def test_get_layout_errors_and_pickling(tmp_path, shared):
    with pytest.raises(DatasetError, match="unknown layout"):
        get_layout("kits", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        get_layout("segthor", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="empty"):
        get_layout("folder", tmp_path).cases()
    layout = get_layout("btcv", shared / "real-ct", shared / "real-ct" / "btcv8_label_map.json")
    assert isinstance(layout, Layout) and pickle.loads(pickle.dumps(layout)) == layout
    assert set(LAYOUTS) == {"btcv", "chaos", "segthor", "nnunet", "folder"}


def test_label_map_json_on_copy(tmp_path, shared):
    """A tiny btcv-style copy: img/ + label/ with the TotalSegmentator map from a JSON."""
    (tmp_path / "img").mkdir()
    (tmp_path / "label").mkdir()
    shutil.copy(shared / "real-ct" / "ct.nii.gz", tmp_path / "img" / "img0001.nii.gz")
    shutil.copy(shared / "real-ct" / "totalseg_labels.nii.gz", tmp_path / "label" / "label0001.nii.gz")
    layout = get_layout("btcv", tmp_path, shared / "real-ct" / "btcv8_label_map.json")
    label = layout.load(layout.cases()[0]).label
    assert np.bincount(label.ravel())[5] == 38634  # liver
    image, _ = read_volume(tmp_path / "img" / "img0001.nii.gz")
    assert 20 < image[label == 5].mean() < 200
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": {"1": "a", "3": "b"}, "map": {"1": 1}}))
    with pytest.raises(DatasetError, match="1..C"):
        get_layout("btcv", tmp_path, bad)
