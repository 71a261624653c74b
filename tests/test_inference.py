"""The inference engine: every slice encoded once, mid-to-ends order with the two chains batched."""

from typing import NamedTuple

import pytest
import torch

from sautomed.evaluation.postprocess import logits_to_labels
from sautomed.models.sautomed.inference import InferenceEngine


class FakeState(NamedTuple):
    last: torch.Tensor  # (B,) index of the previous slice visited by the chain, -1 at start
    unused: torch.Tensor | None


class FakeOut(NamedTuple):
    logits: torch.Tensor
    state: FakeState


class FakeNet:
    """Records encoder inputs and step calls; logits encode (previous slice index) in channel 1."""

    def __init__(self):
        self.encoded = []
        self.steps = []

    def encode(self, images):
        self.encoded.append(images.shape[0])
        return images[:, None, ::4, ::4] * 1.0  # (N, 1, S/4, S/4): slice value as feature

    def initial_state(self, batch, device=None):
        return FakeState(torch.full((batch,), -1.0), None)

    def step(self, f_prev, f_t, f_next, state):
        b = f_t.shape[0]
        t = f_t[:, 0, 0, 0]  # slice index (the volume stores its index as intensity)
        self.steps.append((t.tolist(), f_prev[:, 0, 0, 0].tolist(), f_next[:, 0, 0, 0].tolist()))
        logits = torch.zeros(b, 2, *f_t.shape[-2:])
        logits[:, 1] = state.last.view(b, 1, 1)
        return FakeOut(logits, FakeState(t, None))


def volume(z, s=8):
    return torch.arange(z, dtype=torch.float32).view(z, 1, 1).expand(z, s, s).clone()


@pytest.mark.parametrize("z", [1, 2, 3, 7, 10])
def test_mid_to_ends_encodes_once_and_visits_every_slice_once(z):
    net = FakeNet()
    engine = InferenceEngine(net, "mid_to_ends", encode_chunk=3)
    logits = engine.propagate(engine.encode_volume(volume(z)))
    assert sum(net.encoded) == z  # each slice encoded exactly once
    assert max(net.encoded) <= 3  # chunked
    visited = [t for ts, _, _ in net.steps for t in ts]
    assert sorted(visited) == list(range(z))
    mid = z // 2
    assert net.steps[0][0] == [mid]
    # both chains advance together while both have slices left
    assert all(len(ts) == 2 for ts, _, _ in net.steps[1 : 1 + min(mid, z - 1 - mid)])
    # each slice's state came from its neighbour towards the middle
    prev = logits[:, 1, 0, 0]
    for t in range(z):
        expected = -1 if t == mid else (t + 1 if t < mid else t - 1)
        assert prev[t] == expected


def test_neighbours_repeat_the_edge_slices():
    net = FakeNet()
    engine = InferenceEngine(net, "end_to_end")
    engine.propagate(engine.encode_volume(volume(4)))
    ts, prevs, nexts = zip(*net.steps)
    assert [t[0] for t in ts] == [0, 1, 2, 3]
    assert prevs[0] == [0.0] and nexts[-1] == [3.0]
    assert prevs[2] == [1.0] and nexts[2] == [3.0]


def test_logits_to_labels_resizes_to_original_plane():
    logits = torch.zeros(3, 3, 4, 4)
    logits[:, 2, :2, :] = 5.0
    labels = logits_to_labels(logits, (10, 7), chunk=2)
    assert labels.shape == (3, 10, 7) and labels.dtype == torch.uint8
    assert labels[:, 0, 0].tolist() == [2, 2, 2] and labels[:, -1, 0].tolist() == [0, 0, 0]


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown inference mode"):
        InferenceEngine(FakeNet(), "sideways")


class AutocastSpyNet(FakeNet):
    """Records the CPU autocast dtype (or None) that the encoder and the chain's steps run under."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, torch.dtype | None] = {}

    def _now(self) -> torch.dtype | None:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def encode(self, images):
        self.seen["encode"] = self._now()
        return super().encode(images)

    def step(self, f_prev, f_t, f_next, state):
        self.seen["step"] = self._now()
        return super().step(f_prev, f_t, f_next, state)


@pytest.mark.parametrize(
    ("whole", "encoder", "expected"),
    [
        (None, None, {"encode": None, "step": None}),
        (torch.bfloat16, None, {"encode": torch.bfloat16, "step": torch.bfloat16}),
        (None, torch.bfloat16, {"encode": torch.bfloat16, "step": None}),  # inference.encoder_bf16
    ],
)
def test_the_encoder_can_run_in_bf16_without_the_chain(whole, encoder, expected):
    net = AutocastSpyNet()
    engine = InferenceEngine(net, "mid_to_ends", encode_chunk=4, autocast_dtype=whole, encoder_dtype=encoder)
    feats = engine.encode_volume(volume(5))
    assert feats.dtype == torch.float32  # the chain gets fp32 features either way
    engine.propagate(feats)
    assert net.seen == expected
