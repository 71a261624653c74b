"""DICOM-SEG output (``predict --dicom-seg``): a label map of a DICOM series as a DICOM Segmentation object.

Made with highdicom (optional: ``pip install sautomed[dicom]``), referencing the source series' instances,
one segment per class (label value k = segment k), the fixed colour table as recommended display colours,
and the checkpoint as the algorithm. Organ names the project uses get their SNOMED CT codes; other classes
are coded as "Tissue".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sautomed.data.io import Geometry, VolumeError, atomic_write, dicom_series_files, from_canonical
from sautomed.tools.labels import colour

# class name -> (SNOMED CT code, meaning) of the segmented property type
SNOMED = {
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "right_kidney": ("9846003", "Right kidney"),
    "left_kidney": ("18639004", "Left kidney"),
    "kidney": ("64033007", "Kidney"),
    "gallbladder": ("28231008", "Gallbladder"),
    "stomach": ("69695003", "Stomach"),
    "aorta": ("15825003", "Aorta"),
    "pancreas": ("15776009", "Pancreas"),
    "esophagus": ("32849002", "Esophagus"),
    "heart": ("80891009", "Heart"),
    "trachea": ("44567001", "Trachea"),
}
ANATOMY = ("91723000", "Anatomical Structure")
TISSUE = ("85756007", "Tissue")


def require_highdicom() -> tuple[Any, Any]:
    """(highdicom, pydicom), or a VolumeError saying how to install them."""
    try:
        import highdicom
        import pydicom
    except ImportError as exc:
        raise VolumeError(
            "DICOM-SEG output needs highdicom: pip install 'sautomed[dicom]' (or pip install highdicom)"
        ) from exc
    return highdicom, pydicom


def quiet_highdicom() -> None:
    """highdicom logs one INFO line per module it copies: keep its warnings, drop the chatter."""
    import logging

    logging.getLogger("highdicom").setLevel(logging.WARNING)


def _with_sop_uids(ds: Any, path: Path) -> Any:
    """The dataset with SOPClassUID / SOPInstanceUID taken from its file meta where they are empty or
    missing (some public series keep them only there); a VolumeError naming the file when neither has them."""
    meta = getattr(ds, "file_meta", None)
    for tag, meta_tag in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if str(getattr(ds, tag, "") or "").strip():
            continue
        value = str(getattr(meta, meta_tag, "") or "").strip() if meta is not None else ""
        if not value:
            raise VolumeError(
                f"{path}: no {tag} in the dataset or its file meta: cannot reference it in a DICOM-SEG"
            )
        setattr(ds, tag, value)
    return ds


def write_dicom_seg(
    labels: np.ndarray,
    geom: Geometry,
    series: Path,
    class_names: Sequence[str],
    out: Path,
    algorithm: str = "sautomed",
    version: str = "0",
) -> Path:
    """Write canonical ``labels`` (values 0..C, on the grid of DICOM series ``series``) as DICOM-SEG."""
    hd, pydicom = require_highdicom()
    from pydicom.sr.coding import Code

    quiet_highdicom()

    files = dicom_series_files(series)
    if len(files) != geom.size[2]:
        raise VolumeError(f"{series}: {len(files)} DICOM files for a volume of {geom.size[2]} slices")
    sources = [_with_sop_uids(pydicom.dcmread(f), f) for f in files]
    stored = from_canonical(np.asarray(labels, np.uint8), geom)  # (file order, row, column)
    found = sorted(set(np.unique(stored).tolist()) - {0})
    if found and found[-1] > len(class_names):
        raise VolumeError(f"{out}: label values {found} exceed the {len(class_names)} classes")
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=Code("123109", "DCM", "Artificial Intelligence"), version=version
    )
    segments = []
    for number, name in enumerate(class_names, start=1):
        code, meaning = SNOMED.get(name, TISSUE)
        category = ANATOMY if name in SNOMED else TISSUE
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(name)[:64],
                segmented_property_category=Code(category[0], "SCT", category[1]),
                segmented_property_type=Code(code, "SCT", meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                display_color=hd.color.CIELabColor.from_rgb(*colour(number)),
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stored,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="sautomed",
        manufacturer_model_name=algorithm[:64],
        software_versions=version,
        device_serial_number="0",
        omit_empty_frames=bool(found),  # an empty result keeps its frames: a valid, empty segmentation
    )
    return atomic_write(Path(out), lambda p: seg.save_as(str(p)))
