"""The one place that imports segment-anything.

``segment_anything/__init__.py`` imports its predictor and automatic mask generator, which import torchvision.
torchvision is not a dependency of sautomed (and PyPI's wheels often fail beside a CPU-only torch), so the
package ``__init__`` must not run. We only need ``segment_anything.modeling`` and
``segment_anything.build_sam``, which import nothing but torch and numpy.

How: when ``segment_anything`` is not imported yet, a bare stand-in package module with the real ``__path__``
(from ``importlib.util.find_spec``, which locates the package without executing it) is put in ``sys.modules``
just long enough to import the two submodules; then it is removed again, so that a later genuine
``import segment_anything`` (where torchvision exists) runs the real ``__init__`` and reuses the submodules
that are already imported (same classes). When segment_anything was already imported properly, its submodules
are used as they are.

Every other file imports SAM classes from here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import ModuleType

__all__ = [
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLP",
    "MLPBlock",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "build_sam_module",
    "modeling",
    "sam_model_registry",
]

_PKG = "segment_anything"


def _import_submodules() -> tuple[ModuleType, ModuleType]:
    """Import ``segment_anything.modeling`` and ``.build_sam`` without the package __init__."""
    if _PKG in sys.modules:  # imported properly before (or by a previous call): use it as it is
        return (
            importlib.import_module(f"{_PKG}.modeling"),
            importlib.import_module(f"{_PKG}.build_sam"),
        )
    spec = importlib.util.find_spec(_PKG)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install segment-anything")
    stand_in = types.ModuleType(_PKG)
    stand_in.__path__ = list(spec.submodule_search_locations)  # a package: submodules resolve from here
    stand_in.__file__ = spec.origin
    sys.modules[_PKG] = stand_in
    try:
        modeling_mod = importlib.import_module(f"{_PKG}.modeling")
        build_mod = importlib.import_module(f"{_PKG}.build_sam")
    finally:
        # Leave no stand-in behind: a later `import segment_anything` runs the real __init__.
        if sys.modules.get(_PKG) is stand_in:
            del sys.modules[_PKG]
    return modeling_mod, build_mod


modeling, build_sam_module = _import_submodules()

ImageEncoderViT = modeling.ImageEncoderViT
PromptEncoder = modeling.PromptEncoder
MaskDecoder = modeling.MaskDecoder
TwoWayTransformer = modeling.TwoWayTransformer
Sam = modeling.Sam
MLP = sys.modules[f"{_PKG}.modeling.mask_decoder"].MLP  # the hypernetwork MLP
LayerNorm2d = sys.modules[f"{_PKG}.modeling.common"].LayerNorm2d
MLPBlock = sys.modules[f"{_PKG}.modeling.common"].MLPBlock  # Linear-act-Linear
sam_model_registry = build_sam_module.sam_model_registry
