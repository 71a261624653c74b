"""`inference.sam_refine` (models/sam/refine.py): LiteMedSAM as published re-segments the boxes of the
chain's masks. Real weights and real MR (slow, runs in CI): a degraded mask handed in as the chain's logits
comes back closer to the reference; the boxes grow by the margin; settings that cannot work are refused."""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from sautomed.cli import main
from sautomed.data.layouts import get_layout
from sautomed.data.preprocess import Preprocessing, preprocess
from sautomed.evaluation.postprocess import logits_to_labels
from sautomed.guards import weights_from_elsewhere
from sautomed.models.sam.refine import PretrainedBoxRefiner, worst_case_logits
from sautomed.models.sautomed.inference import InferenceSettings
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig
from sautomed.writers import output_name

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared"
MR = ROOT / "data" / "chaos-mr"
WEIGHTS = ROOT / "weights" / "lite_medsam.pth"
S = 128


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def refiner() -> PretrainedBoxRefiner:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} missing; CI provides ../shared beside the project")
    return PretrainedBoxRefiner(str(WEIGHTS), S, margin=6)


def test_boxes_grow_by_the_margin_and_stay_inside(refiner):
    labels = np.zeros((2, S, S), np.uint8)
    labels[0, 10:20, 30:50] = 1  # rows 10-19, columns 30-49
    labels[0, 0:5, 120:128] = 2  # at the edge: clipped
    labels[1, 60, 60:62] = 1  # 2 pixels: below MIN_PIXELS, no box
    found = refiner.boxes(labels, 2)
    assert [(z, c) for z, c, _ in found] == [(0, 1), (0, 2)]
    assert found[0][2].tolist() == [24, 4, 55, 25]  # x0 y0 x1 y1, each side 6 pixels out
    assert found[1][2].tolist() == [114, 0, 127, 10]


@pytest.mark.slow
def test_a_degraded_chain_mask_comes_back_closer_to_the_reference(refiner):
    layout = get_layout("nnunet", MR)
    loaded = layout.load(layout.cases()[0])
    image, label = preprocess(
        loaded.image, loaded.label, Preprocessing(image_size=S, normalization="percentile")
    )
    zs = [z for z in range(label.shape[0]) if (label[z] == 1).sum() > 200][::4][:6]  # liver slices
    ref = label[zs] == 1
    # the chain's liver: the reference eroded by 5 pixels, with an interior hole (still one component)
    degraded = np.stack([ndimage.binary_erosion(mask, iterations=5) for mask in ref])
    for i, mask in enumerate(degraded):
        dist = ndimage.distance_transform_edt(mask)
        degraded[i] &= dist < 0.6 * dist.max()
    logits = torch.full((len(zs), 5, S, S), -5.0)
    logits[:, 0] = 0.0
    logits[:, 1] = torch.from_numpy(np.where(degraded, 5.0, -5.0))
    volume = torch.from_numpy(image[zs].astype(np.float32))
    scores = refiner.scores(volume, logits, 4)
    assert scores.shape == (len(zs), 5, S, S) and torch.all(scores[:, 0] == 0.5)
    assert torch.all(scores[:, 2:] == 0)  # no other class on these inputs: nothing to refine
    refined = scores.argmax(1).numpy() == 1
    before, after = _dice(degraded, ref), _dice(refined, ref)
    print(f"liver DSC: chain {before:.3f}, refined {after:.3f}")
    assert before < 0.75 and after > 0.85  # the box of the holed mask still spans the organ


def test_refinement_needs_the_litemedsam_backbone_and_its_weights():
    refine = InferenceSettings(sam_refine=True)
    with pytest.raises(ValueError, match="sam_refine needs network.backbone: litemedsam"):
        SAutoMedModule(
            NetworkConfig(backbone="tiny", image_size=64, num_classes=2, encoder_finetune="full"),
            inference=refine,
        )
    frozen = NetworkConfig(
        backbone="litemedsam", image_size=S, num_classes=2, encoder_finetune="frozen", lora_rank=0
    )
    with pytest.raises(ValueError, match="encoder_finetune is 'frozen' but no model.network.sam_checkpoint"):
        SAutoMedModule(frozen, inference=refine)  # a frozen random encoder is refused at once
    with weights_from_elsewhere():  # a checkpoint that does not record where its weights started
        module = SAutoMedModule(frozen, inference=refine)
    with pytest.raises(ValueError, match=r"sam_refine needs network.sam_checkpoint \(LiteMedSAM\)"):
        module.box_refiner()
    with pytest.raises(ValueError, match="sam_refine_margin must be >= 0"):
        PretrainedBoxRefiner(str(WEIGHTS), S, margin=-1)


def _checkpoint(module: SAutoMedModule, path: Path) -> Path:
    """A checkpoint of ``module`` as the run folder would hold it (untrained)."""
    module.class_names = ("liver", "right_kidney", "left_kidney", "spleen")[: module.network_cfg.num_classes]
    module.preprocessing = {"image_size": module.network_cfg.image_size, "normalization": "percentile"}
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    ckpt["pytorch-lightning_version"] = lightning.__version__
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _few_slices(tmp_path: Path, n: int = 6) -> Path:
    """The first shared CHAOS MR case cut to ``n`` slices around its middle (geometry kept by SimpleITK)."""
    img = sitk.ReadImage(str(sorted((MR / "imagesTr").iterdir())[0]))
    mid = img.GetSize()[2] // 2
    path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(img[:, :, mid - n // 2 : mid + n // 2], str(path))
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sam-refine"], "inference.sam_refine needs network.backbone: litemedsam"),
        (["--source", "dense"], "inference.source: dense needs a checkpoint trained with network.dense_head"),
    ],
)
def test_predict_refuses_what_a_tiny_checkpoint_cannot_do(tmp_path, capsys, flags, message):
    tiny = SAutoMedModule(
        NetworkConfig(backbone="tiny", image_size=64, num_classes=4, encoder_finetune="full")
    )
    ckpt = _checkpoint(tiny, tmp_path / "tiny.ckpt")
    src = _few_slices(tmp_path)
    argv = ["predict", "--ckpt_path", str(ckpt), "--input", str(src), "--output", str(tmp_path / "out")]
    assert main([*argv, *flags, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.slow
def test_predict_with_sam_refine_writes_labels_on_the_input_grid(tmp_path, capsys):
    net = NetworkConfig(
        backbone="litemedsam",
        image_size=S,
        num_classes=4,
        sam_checkpoint=str(WEIGHTS),
        encoder_finetune="frozen",
        lora_rank=0,
        decoder="per_class",
    )
    ckpt = _checkpoint(SAutoMedModule(net, inference=InferenceSettings(sam_refine=True)), tmp_path / "l.ckpt")
    src = _few_slices(tmp_path)
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(ckpt), "--input", str(src), "--output", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main([*argv[:-3], "--output", str(tmp_path / "plain"), "--no-sam-refine", "--no-progress"]) == 0
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / output_name(src))))
    refined = sitk.GetArrayFromImage(sitk.ReadImage(str(out / output_name(src))))
    assert not np.array_equal(plain, refined)  # the checkpoint's refinement, and the flag that turns it off
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out / output_name(src)))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(b))) <= {0, 1, 2, 3, 4}


def test_the_benchs_worst_case_puts_every_class_on_every_slice(refiner):
    logits = worst_case_logits(3, 4, S)
    labels = logits_to_labels(logits, (S, S)).numpy()
    assert [sorted(set(np.unique(z)) - {0}) for z in labels] == [[1, 2, 3, 4]] * 3
    assert len(refiner.boxes(labels, 4)) == 3 * 4


def test_one_decoder_call_per_slice_equals_one_per_box(refiner):
    torch.manual_seed(0)
    feat = torch.randn(1, 256, S // 4, S // 4)
    boxes = torch.tensor([[10.0, 12, 60, 70], [64, 30, 120, 90], [0, 0, 127, 127]])
    together = refiner.sam.image_box_probabilities(feat, boxes)
    alone = refiner.sam.box_probabilities(feat.expand(3, -1, -1, -1), boxes)
    assert together.shape == (3, S, S) and torch.allclose(together, alone, atol=1e-5)


@pytest.mark.slow
def test_a_frozen_published_encoders_features_serve_the_refiner(refiner):
    """The network's features of the frozen published encoder replace the refiner's own encoder pass (the
    slices in the network's normalisation: the masks equal those of the network's features); an encoder of
    other weights never serves."""
    rng = np.random.default_rng(0)
    volume = torch.from_numpy(rng.random((3, S, S)).astype(np.float32) * 0.9)  # spans [0, 0.9): min-max acts
    logits = torch.full((3, 3, S, S), -5.0)
    logits[:, 0] = 0.0
    logits[:, 1, 40:80, 30:70] = 5.0
    logits[2, 1] = -5.0  # slice 2 holds no box: neither encoded nor decoded
    encoder = refiner.sam.image_encoder
    with torch.no_grad():
        feats = encoder(volume[:, None].expand(-1, 3, -1, -1))  # what the network's encode gives
    calls = []
    original = refiner.sam.encode
    refiner.sam.encode = lambda x: calls.append(len(x)) or original(x)
    try:
        alone = refiner.scores(volume, logits, 2)
        assert sum(calls) == 2
        shared = refiner.scores(volume, logits, 2, shared=(encoder, feats))
        assert sum(calls) == 2  # no slice encoded again
        box = torch.tensor([[30.0 - 6, 40 - 6, 69 + 6, 79 + 6]])  # the component's box grown by the margin
        for z in (0, 1):
            expected = refiner.sam.image_box_probabilities(feats[z : z + 1], box)[0]
            torch.testing.assert_close(shared[z, 1], expected, atol=1e-5, rtol=0)
        assert (shared[2, 1] == 0).all() and (shared[:, 0] == 0.5).all()
        assert not torch.allclose(shared[:2, 1], alone[:2, 1], atol=1e-3)  # min-max did act on `alone`
        other = type(encoder)()  # other weights: never shared
        other.load_state_dict(encoder.state_dict())
        with torch.no_grad():
            next(other.parameters()).add_(0.1)
        assert not refiner.same_encoder(other) and refiner.same_encoder(encoder)
        refiner.scores(volume, logits, 2, shared=(other, feats))
        assert sum(calls) == 2 + 2
    finally:
        refiner.sam.encode = original
