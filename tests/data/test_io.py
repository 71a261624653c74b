from __future__ import annotations

import errno
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sautomed.data import io
from sautomed.data.io import (
    VolumeError,
    from_canonical,
    is_dicom_dir,
    is_volume_file,
    read_array,
    read_label_volume,
    read_volume,
    to_canonical,
    write_label_volume,
    write_volume,
)


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def assert_canonical(path: Path, geom: io.Geometry) -> None:
    """Walking along canonical axis k moves mostly along physical axis (z, y, x)[k], in the + direction."""
    image = sitk.ReadImage(str(path))
    size = image.GetSize()
    code = np.arange(np.prod(size)).reshape(size[::-1])  # stored numpy array of linear indices
    canon = to_canonical(code, geom)
    assert canon.shape == geom.shape_zyx

    def physical(linear: int) -> np.ndarray:
        k, rest = divmod(int(linear), size[0] * size[1])
        j, i = divmod(rest, size[0])
        return np.array(image.TransformIndexToPhysicalPoint((i, j, k)))

    for k in range(3):
        if canon.shape[k] < 2:
            continue
        step = [0, 0, 0]
        step[k] = 1
        delta = physical(canon[tuple(step)]) - physical(canon[0, 0, 0])
        p = 2 - k  # physical axis (x=0 L, y=1 P, z=2 S) of canonical axis k
        assert delta[p] > 0 and abs(delta[p]) >= np.abs(delta).max() - 1e-9, (k, delta)
        assert np.isclose(np.linalg.norm(delta), geom.spacing_zyx[k])


AWKWARD = {
    "axial": ((6, 5, 4), np.eye(3), np.int16),
    "coronal": ((5, 6, 4), np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]), np.int16),  # index (x, z, y)
    "sagittal": ((5, 6, 4), np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]), np.float32),  # index (y, z, x)
    "oblique": ((4, 5, 6), rotation(0, 25) @ rotation(2, 30), np.int32),
    "left_handed": ((4, 5, 6), np.diag([1.0, 1.0, -1.0]), np.float64),
    "ras_like_uint8": ((4, 5, 6), np.diag([-1.0, -1.0, 1.0]), np.uint8),
    "one_slice": ((1, 5, 6), np.eye(3), np.int16),
    "two_slices": ((2, 5, 6), rotation(1, 40), np.float32),
    "odd_7x13x29": ((29, 13, 7), rotation(2, -70), np.int16),
}


@pytest.mark.parametrize("name", list(AWKWARD))
def test_round_trip_awkward(tmp_path, stored_writer, name):
    shape, direction, dtype = AWKWARD[name]
    rng = np.random.default_rng(0)
    stored = (rng.integers(0, 200, shape)).astype(dtype)
    src = stored_writer(
        tmp_path / "in.nii.gz", stored, (0.7, 0.9, 2.5), (10.0, -20.0, 30.0), direction.ravel()
    )
    canon, geom = read_array(src)
    assert canon.dtype == dtype
    assert_canonical(src, geom)
    assert np.array_equal(from_canonical(canon, geom), stored)
    volume, _ = read_volume(src)
    assert volume.dtype == np.float32 and volume.shape == geom.shape_zyx

    out = write_volume(canon, geom, tmp_path / "out.nii.gz")
    labels = write_label_volume((canon % 7).astype(np.uint8), geom, tmp_path / "lab.nii.gz")
    for written, expected in ((out, stored), (labels, stored % 7)):
        back = sitk.ReadImage(str(written))
        ref = sitk.ReadImage(str(src))
        assert back.GetSize() == ref.GetSize()
        assert np.allclose(back.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        assert np.allclose(back.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        assert np.allclose(back.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(back), expected)
        assert np.allclose(nib.load(written).affine, nib.load(src).affine, atol=1e-4)
        source_voxels = np.asarray(nib.load(src).dataobj)
        if written == labels:
            source_voxels = source_voxels % 7
        assert np.array_equal(np.asarray(nib.load(written).dataobj), source_voxels)
    assert sitk.ReadImage(str(labels)).GetPixelID() == sitk.sitkUInt8


def test_coronal_storage_reads_like_axial(tmp_path, stored_writer):
    canon = np.random.default_rng(1).integers(0, 1000, (5, 6, 7)).astype(np.int16)  # (z, y, x)
    axial = stored_writer(tmp_path / "axial.nii.gz", canon, (0.5, 0.6, 3.0))
    # coronal voxel order: index axes (x, z towards inferior, y): numpy (y, z, x) with z reversed
    coronal_stored = np.ascontiguousarray(np.transpose(canon[::-1], (1, 0, 2)))
    coronal = stored_writer(
        tmp_path / "coronal.nii.gz", coronal_stored, (0.5, 3.0, 0.6), direction=(1, 0, 0, 0, 0, 1, 0, -1, 0)
    )
    a, ga = read_volume(axial)
    c, gc = read_volume(coronal)
    assert np.array_equal(a, c)
    assert ga.spacing_zyx == pytest.approx(gc.spacing_zyx) and gc.spacing_zyx == pytest.approx(
        (3.0, 0.6, 0.5)
    )
    assert gc.axes == (1, 0, 2) and gc.flips == (True, False, False)


REAL_FILES = [
    "real-ct/ct.nii.gz",
    "real-ct/totalseg_labels.nii.gz",
    "chaos-mr/imagesTr/chaosmr_002_0000.nii.gz",
    "chaos-mr/labelsTr/chaosmr_002.nii.gz",
    "segthor/train/Patient_01/GT.nii.gz",
]


@pytest.mark.parametrize("rel", REAL_FILES)
def test_round_trip_real_files(tmp_path, shared, rel):
    src = shared / rel
    canon, geom = read_array(src)
    assert_canonical(src, geom)
    out = write_volume(canon, geom, tmp_path / "out.nii.gz")
    ref, back = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert back.GetSize() == ref.GetSize() and back.GetDirection() == ref.GetDirection()
    assert np.allclose(back.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
    assert np.allclose(back.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ref))
    assert np.allclose(nib.load(out).affine, nib.load(src).affine, atol=1e-4)


def test_round_trip_real_dicom(tmp_path, shared):
    series = shared / "chaos-ct/Train_Sets/CT/1/DICOM_anon"
    image, geom = read_volume(series)
    assert image.shape == (78, 512, 512) and geom.spacing_zyx == pytest.approx((2.0, 0.7265625, 0.7265625))
    labels = (image > 100).astype(np.uint8)
    out = write_label_volume(labels, geom, tmp_path / "pred.nii.gz")
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == geom.size and back.GetOrigin() == pytest.approx(geom.origin)
    assert back.GetDirection() == pytest.approx(geom.direction)
    assert np.array_equal(read_label_volume(out, reference=geom), labels)


def test_real_orientation_is_patient_based(shared):
    """Right organs at smaller canonical x than left ones; superior organs at larger z."""

    def centre(labels, value):
        return np.argwhere(labels == value).mean(axis=0)  # (z, y, x)

    _, geom = read_volume(shared / "chaos-mr/imagesTr/chaosmr_001_0000.nii.gz")
    mr = read_label_volume(shared / "chaos-mr/labelsTr/chaosmr_001.nii.gz", reference=geom)
    assert centre(mr, 1)[2] < centre(mr, 4)[2]  # liver (right) left of spleen in x
    assert centre(mr, 2)[2] < centre(mr, 3)[2]  # right kidney before left kidney
    ct = read_label_volume(shared / "real-ct/totalseg_labels.nii.gz")
    assert centre(ct, 2)[2] < centre(ct, 3)[2]  # TotalSegmentator 2 right kidney, 3 left kidney
    assert centre(ct, 5)[2] < centre(ct, 1)[2]  # liver vs spleen
    seg = read_label_volume(shared / "segthor/train/Patient_01/GT.nii.gz")
    assert centre(seg, 3)[0] > centre(seg, 2)[0]  # trachea above the heart
    assert centre(seg, 2)[1] < centre(seg, 1)[1]  # heart anterior to the esophagus


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs_name_the_file(tmp_path, stored_writer):
    cases = {}
    cases["missing"] = tmp_path / "missing.nii.gz"
    cases["empty"] = tmp_path / "empty.nii.gz"
    cases["empty"].write_bytes(b"")
    full = stored_writer(tmp_path / "full.nii.gz", np.random.default_rng(0).normal(size=(20, 30, 30)))
    raw = gzip.decompress(full.read_bytes())
    cases["truncated"] = tmp_path / "truncated.nii.gz"
    cases["truncated"].write_bytes(gzip.compress(raw[: len(raw) // 2]))
    cases["cut"] = tmp_path / "cut.nii.gz"  # bytes cut off mid-stream
    cases["cut"].write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    cases["cut_nii"] = tmp_path / "cut.nii"
    cases["cut_nii"].write_bytes(raw[: len(raw) - 100])
    cases["cut_mha"] = stored_writer(tmp_path / "cut.mha", np.zeros((20, 30, 30), np.int16))
    cases["cut_mha"].write_bytes(cases["cut_mha"].read_bytes()[:-1000])
    cases["2d"] = tmp_path / "two_d.nii.gz"
    sitk.WriteImage(sitk.Image([8, 9], sitk.sitkInt16), str(cases["2d"]))
    cases["4d"] = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkFloat32), str(cases["4d"]))
    cases["vector"] = tmp_path / "vector.nii.gz"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3), str(cases["vector"]))
    cases["no_dicom"] = tmp_path / "no_dicom"
    cases["no_dicom"].mkdir()
    (cases["no_dicom"] / "notes.txt").write_text("hello")
    for kind, path in cases.items():
        with pytest.raises(VolumeError) as info:
            read_volume(path)
        assert str(path) in str(info.value), kind
    assert "4D" in str(pytest.raises(VolumeError, read_volume, cases["4d"]).value)
    assert "2D" in str(pytest.raises(VolumeError, read_volume, cases["2d"]).value)


def test_float_labels(tmp_path, stored_writer):
    ok = stored_writer(tmp_path / "ok.nii.gz", np.array([[[0.0, 1.0], [2.0, 3.0]]]))
    labels = read_label_volume(ok)
    assert labels.dtype == np.int16 and labels.max() == 3
    bad = stored_writer(tmp_path / "bad.nii.gz", np.array([[[0.0, 1.5], [2.0, 3.0]]]))
    with pytest.raises(VolumeError, match=r"bad\.nii\.gz.*non-integer"):
        read_label_volume(bad)


@pytest.mark.parametrize(
    "prop,change",
    [
        ("size", dict(shape=(4, 5, 7))),
        ("spacing", dict(spacing=(1.0, 1.0, 2.2))),
        ("origin", dict(origin=(0.0, 3.0, 0.0))),
        ("direction", dict(direction=rotation(2, 5).ravel())),
    ],
)
def test_label_grid_mismatch(tmp_path, stored_writer, prop, change):
    image = stored_writer(tmp_path / "image.nii.gz", np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 2.0))
    args = dict(shape=(4, 5, 6), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3).ravel())
    args.update(change)
    label = stored_writer(
        tmp_path / "label.nii.gz",
        np.zeros(args["shape"], np.uint8),
        args["spacing"],
        args["origin"],
        args["direction"],
    )
    _, geom = read_volume(image)
    with pytest.raises(VolumeError) as info:
        read_label_volume(label, reference=geom)
    message = str(info.value)
    assert str(label) in message and str(image) in message and prop in message
    # within tolerance is accepted
    near = stored_writer(tmp_path / "near.nii.gz", np.zeros((4, 5, 6), np.uint8), (1.0, 1.0, 2.0 + 1e-6))
    read_label_volume(near, reference=geom)


def test_nonfinite_replaced_with_warning(tmp_path, stored_writer):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    data[0, 0, 0], data[0, 0, 1], data[1, 2, 3] = np.nan, np.inf, -np.inf
    path = stored_writer(tmp_path / "nan.nii.gz", data)
    with pytest.warns(UserWarning, match=r"nan\.nii\.gz.*3 non-finite"):
        volume, _ = read_volume(path)
    assert np.isfinite(volume).all()
    assert volume[0, 0, 0] == 2.0 and volume[0, 0, 1] == 22.0 and volume[1, 2, 3] == 2.0
    allbad = stored_writer(tmp_path / "allnan.nii.gz", np.full((1, 2, 2), np.nan, np.float32))
    with pytest.warns(UserWarning, match="4 non-finite"):
        assert (read_volume(allbad)[0] == 0).all()
    constant = stored_writer(tmp_path / "const.nii.gz", np.full((2, 2, 2), 5, np.int16))
    assert (read_volume(constant)[0] == 5).all()


# ------------------------------------------------------------------------------------------ writing


def test_write_refuses_existing_and_leaves_no_partial_file(tmp_path, stored_writer, monkeypatch):
    src = stored_writer(tmp_path / "image.nii.gz", np.zeros((3, 4, 5), np.int16))
    _, geom = read_volume(src)
    out = tmp_path / "pred" / "case.nii.gz"
    write_label_volume(np.ones(geom.shape_zyx, np.uint8), geom, out)
    before = out.read_bytes()
    with pytest.raises(FileExistsError):
        write_label_volume(np.zeros(geom.shape_zyx, np.uint8), geom, out)

    def no_space(image, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # the writer got half way
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io.sitk, "WriteImage", no_space)
    with pytest.raises(OSError) as info:
        write_label_volume(np.zeros(geom.shape_zyx, np.uint8), geom, out, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        write_label_volume(np.zeros(geom.shape_zyx, np.uint8), geom, tmp_path / "pred" / "new.nii.gz")
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.nii.gz"]  # no temp, no partial new file
    assert out.read_bytes() == before


def test_write_checks_shape_and_values(tmp_path, stored_writer):
    _, geom = read_volume(stored_writer(tmp_path / "image.nii.gz", np.zeros((3, 4, 5), np.int16)))
    with pytest.raises(VolumeError, match="shape"):
        write_label_volume(np.zeros((3, 5, 4), np.uint8), geom, tmp_path / "a.nii.gz")
    with pytest.raises(VolumeError, match="uint8"):
        write_label_volume(np.full((3, 4, 5), 300), geom, tmp_path / "b.nii.gz")


def test_other_formats(tmp_path, stored_writer):
    data = np.random.default_rng(2).integers(-5, 5, (3, 4, 5)).astype(np.int16)
    for name in ("a.nrrd", "b.mha", "c.mhd", "d.nii"):
        path = stored_writer(tmp_path / name, data, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
        assert is_volume_file(path)
        volume, geom = read_volume(path)
        assert np.array_equal(from_canonical(volume, geom), data)
    assert is_volume_file(tmp_path / "d.nii") and not is_volume_file(tmp_path / "c.raw")
    (tmp_path / "UPPER.NII.GZ").write_bytes(b"x")
    assert is_volume_file(tmp_path / "UPPER.NII.GZ")


def test_dicom_series(tmp_path, dicom_writer):
    volume = np.random.default_rng(3).integers(-100, 100, (5, 6, 7)).astype(np.int16)
    folder = tmp_path / "series"
    dicom_writer(folder, volume, spacing=(2.5, 0.5, 0.6), names=[f"x{k}.dcm" for k in (3, 0, 4, 1, 2)])
    assert is_dicom_dir(folder) and not is_dicom_dir(tmp_path)
    image, geom = read_volume(folder)
    assert np.array_equal(image, volume) and geom.spacing_zyx == pytest.approx((2.5, 0.5, 0.6))


def test_dicom_two_series_and_missing_slice(tmp_path, dicom_writer):
    folder = tmp_path / "two"
    dicom_writer(
        folder, np.zeros((4, 6, 6), np.int16), series_uid="1.2.3.4", names=[f"a{k}.dcm" for k in range(4)]
    )
    dicom_writer(
        folder, np.ones((2, 6, 6), np.int16), series_uid="1.2.3.5", names=[f"b{k}.dcm" for k in range(2)]
    )
    with pytest.warns(UserWarning, match=r"2 DICOM series.*using 1\.2\.3\.4"):
        image, _ = read_volume(folder)
    assert image.shape == (4, 6, 6)
    gap = tmp_path / "gap"
    dicom_writer(gap, np.zeros((4, 6, 6), np.int16), z_positions=[0.0, 2.0, 6.0, 8.0])
    with pytest.warns(UserWarning, match="uneven DICOM slice spacing"):
        read_volume(gap)


def test_an_oblique_stack_is_sliced_along_its_acquisition_and_written_back_exactly(tmp_path, oblique_stack):
    from sautomed.data.io import read_label_volume, read_volume, write_label_volume

    _, labels = oblique_stack(tmp_path)
    image, geom = read_volume(tmp_path / "oblique_0000.nii.gz")
    assert image.shape == (12, 64, 64) and geom.spacing_zyx[0] == 8.0  # 12 slices, not 64 of 12 x 64
    canonical = read_label_volume(tmp_path / "oblique_labels.nii.gz", reference=geom)
    assert canonical.shape == (12, 64, 64) and int(canonical.sum()) == int(labels.sum())
    write_label_volume(canonical, geom, tmp_path / "back.nii.gz")
    import SimpleITK as sitk

    a, b = (
        sitk.ReadImage(str(tmp_path / "oblique_labels.nii.gz")),
        sitk.ReadImage(str(tmp_path / "back.nii.gz")),
    )
    assert a.GetSpacing() == b.GetSpacing() and a.GetDirection() == b.GetDirection()
    assert a.GetOrigin() == b.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_a_nearly_isotropic_volume_keeps_the_patient_axes():
    from sautomed.data.io import orientation

    direction = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # index i along patient z, k along x
    assert orientation(direction, (1.0, 1.0, 2.5))[0] == orientation(direction)[0]  # 2.5 < 3: patient axes
    assert orientation(direction, (1.0, 1.0, 3.5))[0] != orientation(direction)[0]  # the stack becomes z
