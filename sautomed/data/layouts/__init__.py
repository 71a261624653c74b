"""Dataset layouts: where a dataset keeps its images and labels, and how its label values map to classes.

``get_layout(name, root, label_map=None, channels=1)`` returns a :class:`Layout` (a small picklable value);
its ``cases()`` lists the cases and ``load(case)`` reads one as canonical arrays
(see :mod:`sautomed.data.io`).

Discovery rules (a folder where some images have a label and others do not reports the unlabelled ones as
orphans, and ``cases()`` raises :class:`DatasetError` naming them; where no image has a label, e.g. a test
set, every case has ``label=None``):

- ``btcv``: ``root/img/imgXXXX.nii.gz`` + ``root/label/labelXXXX.nii.gz``, case id ``XXXX``; the 13 BTCV
  organs map to the paper's 8, others to background. Without ``img/`` and ``label/``, ``root`` must hold one
  image + label pair: the label is the volume file whose name contains ``label``, ``seg``, ``gt`` or ``mask``,
  the image the single other volume file (e.g. ``real-ct``: ``ct.nii.gz`` + ``totalseg_labels.nii.gz``); the
  case id is the folder name.
- ``chaos``: CHAOS ``Train_Sets/CT/<id>/DICOM_anon`` + ``Ground/*.png`` (CT: liver) or
  ``Train_Sets/MR/<id>/T2SPIR/DICOM_anon`` + ``T2SPIR/Ground`` (MR T2-SPIR: liver, right kidney, left kidney,
  spleen). ``root`` may be the dataset top, ``Train_Sets``, ``Train_Sets/CT|MR`` or one patient folder; a
  root holding both CT and MR patients is an error (point it at ``CT`` or ``MR``). PNG slices are matched to
  DICOM slices by the files' content: the PNG with the k-th smallest number in its name is the DICOM file
  with the k-th smallest InstanceNumber (0020,0013), placed at that file's position in the series; PNG
  rows/columns are the DICOM rows/columns, no flip (checked on real CHAOS CT: mean HU in the liver 141).
- ``segthor``: ``Patient_XX/Patient_XX.nii.gz`` + ``Patient_XX/GT.nii.gz`` under ``root/train`` if it exists,
  else under ``root`` (a folder of patients), or ``root`` itself being one patient folder.
- ``nnunet`` (and MSD): ``dataset.json`` (labels ``{name: int}`` or MSD ``{"0": "background", ...}``,
  ``file_ending`` default ``.nii.gz``), ``imagesTr/CASE_0000<ending>`` (channel 0; with ``channels`` C > 1
  also ``CASE_0001`` .. ``CASE_000{C-1}``, which must share channel 0's grid) or MSD
  ``imagesTr/CASE<ending>``, ``labelsTr/CASE<ending>``; an MSD ``training`` list, when present, names the
  files. Label values are mapped to 1..C in the order of their declared values.
- ``folder``: every volume file and DICOM series sub-folder of ``root``, unlabelled (for prediction); a
  broken symbolic link there is an orphan.

A ``label_map`` JSON (``{"classes": {"1": name, ...}, "map": {source: target, ...}}``) overrides the class
names and map of any layout with labels; unmapped source values then become background.
"""

from __future__ import annotations

from .btcv import BTCV_CLASSES, BTCV_MAP
from .cases import Case, Discovery, LabelMap, LoadedCase, Orphan
from .chaos import CHAOS_CT_CLASSES, CHAOS_CT_MAP, CHAOS_MR_CLASSES, CHAOS_MR_MAP, read_png_stack
from .layout import LAYOUTS, DatasetError, Layout, describe, get_layout
from .nnunet import channel_files, read_channels
from .segthor import SEGTHOR_CLASSES

__all__ = [
    "BTCV_CLASSES",
    "BTCV_MAP",
    "CHAOS_CT_CLASSES",
    "CHAOS_CT_MAP",
    "CHAOS_MR_CLASSES",
    "CHAOS_MR_MAP",
    "LAYOUTS",
    "SEGTHOR_CLASSES",
    "Case",
    "DatasetError",
    "Discovery",
    "LabelMap",
    "Layout",
    "LoadedCase",
    "Orphan",
    "channel_files",
    "describe",
    "get_layout",
    "read_channels",
    "read_png_stack",
]
