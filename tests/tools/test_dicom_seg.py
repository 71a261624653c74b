"""DICOM-SEG output (optional highdicom): frames on the right source instances, segments named and coded."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd  # the test extra installs it: a broken install fails here, never skips
import numpy as np
import pydicom

from sautomed.data.io import dicom_series_files, from_canonical, read_label_volume, read_volume
from sautomed.data.layouts import get_layout


def _decode(path, series) -> np.ndarray:
    """The segmentation as a label array in the series' file order, frame by source SOP instance."""
    seg = hd.seg.segread(str(path))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in dicom_series_files(series)]
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, ignore_spatial_locations=True
    )


def test_chaos_ct_reference_round_trips_through_dicom_seg(shared, tmp_path):
    from sautomed.tools.dicom_seg import write_dicom_seg
    from sautomed.tools.labels import colour

    layout = get_layout("chaos", shared / "chaos-ct")
    case = layout.cases()[0]
    loaded = layout.load(case)
    out = write_dicom_seg(loaded.label, loaded.geom, case.image, layout.class_names, tmp_path / "x.seg.dcm")
    np.testing.assert_array_equal(_decode(out, case.image), from_canonical(loaded.label, loaded.geom))
    ds = pydicom.dcmread(out)
    segment = ds.SegmentSequence[0]
    assert (
        segment.SegmentLabel == "liver"
        and segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    )
    rgb = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(rgb, colour(1), atol=2)


def test_predict_writes_dicom_seg_for_a_dicom_series(shared, untrained_ckpt, tmp_path):
    from sautomed.cli import main

    series = shared / "chaos-ct" / "Train_Sets" / "CT" / "1" / "DICOM_anon"
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(untrained_ckpt), "--input", str(series), "--output", str(out)]
    assert main([*argv, "--no-progress", "--dicom-seg"]) == 0
    _, geom = read_volume(series)
    labels = read_label_volume(out / "DICOM_anon.nii.gz", reference=geom)
    decoded = _decode(out / "DICOM_anon.seg.dcm", series)
    np.testing.assert_array_equal(decoded, from_canonical(labels, geom))
    assert pydicom.dcmread(out / "DICOM_anon.seg.dcm").SegmentSequence[4].SegmentLabel == "aorta"


def _dciodvfy_errors(path) -> list[str]:
    """The reference validator's (dicom3tools' dciodvfy) error lines for a DICOM file."""
    tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy (Debian's dicom3tools) is not installed: .ci/run installs it"
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_dicom_seg_of_the_shared_ct_series_passes_the_reference_validator(shared, tmp_path):
    from sautomed.tools.dicom_seg import write_dicom_seg

    layout = get_layout("chaos", shared / "chaos-ct")
    case = layout.cases()[0]
    loaded = layout.load(case)
    out = write_dicom_seg(loaded.label, loaded.geom, case.image, layout.class_names, tmp_path / "x.seg.dcm")
    assert _dciodvfy_errors(out) == []


def test_a_series_with_empty_sop_uids_takes_them_from_the_file_meta(shared, untrained_ckpt, tmp_path, caplog):
    from sautomed.cli import main

    series = tmp_path / "series"
    series.mkdir()
    for f in dicom_series_files(shared / "chaos-ct" / "Train_Sets" / "CT" / "1" / "DICOM_anon"):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID, ds.SOPInstanceUID = "", ""  # as in TotalSegmentator's example CT: the meta has both
        ds.save_as(series / Path(f).name)
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(untrained_ckpt), "-i", str(series), "-o", str(out)]
    with caplog.at_level("INFO"):
        assert main([*argv, "--no-progress", "--dicom-seg"]) == 0
    assert not [r for r in caplog.records if r.name.startswith("highdicom") and r.levelname == "INFO"]
    seg = pydicom.dcmread(out / "series.seg.dcm")
    metas = {pydicom.dcmread(f).file_meta.MediaStorageSOPInstanceUID for f in dicom_series_files(series)}
    referenced = {
        item.ReferencedSOPInstanceUID
        for ref in seg.ReferencedSeriesSequence
        for item in ref.ReferencedInstanceSequence
    }
    assert referenced and referenced <= metas
