"""Volume inference: every slice encoded once (in chunks), then slice-to-slice propagation.

`mid_to_ends` (default, the paper's): the middle slice from the initial state, then the two chains (towards
the first and towards the last slice) advance together as one batch of 2. `end_to_end`: first slice to last.
Neighbour features come from the encoded cache; volume edges repeat the edge slice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from sautomed.errors import UserError
from sautomed.evaluation.postprocess import logits_to_labels

log = logging.getLogger(__name__)
_warned_bf16 = False  # the slow-bf16 warning: once per process

Mode = Literal["mid_to_ends", "end_to_end"]
MODES: tuple[str, ...] = ("mid_to_ends", "end_to_end")


@dataclass(frozen=True)
class InferenceSettings:
    """How volumes are segmented in validate / test / predict.

    Args:
        mode: `mid_to_ends` (middle slice first, then both chains as a batch of 2) or `end_to_end`.
        encode_chunk: slices per encoder call (bounds memory).
        largest_component: keep only the largest 3D connected component of each class.
        bf16: run the network under bfloat16 autocast.
        encoder_bf16: run only the image encoder under bfloat16 autocast (the slice chain in fp32). On a CPU
            with AMX (Intel Sapphire Rapids and newer) the LiteMedSAM encoder runs about 2x faster, while
            the chain's small ops would run slower in bf16 (hence the encoder only); without AMX it is slower.
        sam_refine: LiteMedSAM as published re-segments the box of each class's largest component on every
            slice (`models/sam/refine.py`; backbone litemedsam and its `network.sam_checkpoint` only).
        sam_refine_margin: pixels of S added to each side of those boxes.
        source: ``chain`` (the slice chain's logits) or ``dense`` (the network's dense proposals alone,
            ``network.dense_head``: the ablation of everything after them).
    """

    mode: Mode = "mid_to_ends"
    encode_chunk: int = 8
    largest_component: bool = False
    bf16: bool = False
    encoder_bf16: bool = False
    sam_refine: bool = False
    sam_refine_margin: int = 6
    source: Literal["chain", "dense"] = "chain"


class SliceNetwork(Protocol):
    """What the engine needs from a slice-propagating network (model-family agnostic)."""

    def encode(self, images: Tensor) -> Tensor: ...

    def initial_state(self, batch: int, device: torch.device | None = None): ...

    def step(self, f_prev: Tensor, f_t: Tensor, f_next: Tensor, state): ...


def warn_if_bf16_is_slow(device: torch.device, dtype: torch.dtype | None) -> None:
    """Say once per process that bf16 autocast on a CPU without native bf16 is slower than fp32."""
    global _warned_bf16
    if dtype == torch.bfloat16 and device.type == "cpu" and not _warned_bf16 and not cpu_has_native_bf16():
        _warned_bf16 = True
        log.warning(
            "this CPU has no native bfloat16 (AMX or AVX512-BF16): bf16 will be slower than fp32 here"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX or AVX512-BF16); elsewhere it is emulated."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _take_state(state, index: Tensor):
    """Select chains `index` from every tensor of a state tuple (None stays None)."""
    return type(state)(*(None if s is None else s[index] for s in state))


def _cat_states(a, b):
    return type(a)(*(None if x is None else torch.cat([x, y], 0) for x, y in zip(a, b)))


class InferenceEngine:
    """Encode a whole volume once, then propagate the state from slice to slice.

    Args:
        net: the slice network (encode / initial_state / step).
        mode: `mid_to_ends` or `end_to_end`.
        encode_chunk: slices per encoder call (bounds memory).
        autocast_dtype: e.g. torch.bfloat16 to run under autocast, None for fp32.
        encoder_dtype: the encoder's autocast dtype, when it differs (None: ``autocast_dtype``).
    """

    def __init__(
        self,
        net: SliceNetwork,
        mode: Mode = "mid_to_ends",
        encode_chunk: int = 8,
        autocast_dtype: torch.dtype | None = None,
        encoder_dtype: torch.dtype | None = None,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"unknown inference mode {mode!r}; choose one of {MODES}")
        if encode_chunk < 1:
            raise UserError("encode_chunk must be >= 1")
        self.net = net
        self.mode = mode
        self.encode_chunk = encode_chunk
        self.autocast_dtype = autocast_dtype
        self.encoder_dtype = encoder_dtype or autocast_dtype

    def _autocast(self, device: torch.device, dtype: torch.dtype | None = None):
        dtype = dtype or self.autocast_dtype
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    @torch.no_grad()
    def encode_volume(self, volume: Tensor) -> Tensor:
        """(Z, S, S) in [0, 1] -> (Z, D, h, w): each slice through the encoder exactly once."""
        chunks = []
        warn_if_bf16_is_slow(volume.device, self.encoder_dtype)  # the encoder's dtype is bf16 if any is
        with self._autocast(volume.device, self.encoder_dtype):
            for start in range(0, volume.shape[0], self.encode_chunk):
                chunks.append(self.net.encode(volume[start : start + self.encode_chunk]).float())
        return torch.cat(chunks, 0)

    @torch.no_grad()
    def propagate(self, feats: Tensor) -> Tensor:
        """(Z, D, h, w) encoded slices -> (Z, C+1, S/4, S/4) logits, in the engine's mode."""
        z = feats.shape[0]
        device = feats.device
        logits: list[Tensor | None] = [None] * z

        def run(ts: list[int], state):
            idx = torch.tensor(ts, device=device)
            prev = feats[(idx - 1).clamp(min=0)]
            nxt = feats[(idx + 1).clamp(max=z - 1)]
            with self._autocast(device):
                out = self.net.step(prev, feats[idx], nxt, state)
            for i, t in enumerate(ts):
                logits[t] = out.logits[i].float()
            return out.state

        if self.mode == "end_to_end":
            state = self.net.initial_state(1, device)
            for t in range(z):
                state = run([t], state)
        else:
            mid = z // 2
            state = run([mid], self.net.initial_state(1, device))
            chains = (list(range(mid - 1, -1, -1)), list(range(mid + 1, z)))  # down, up
            active = [0, 1]
            states = _cat_states(state, state)  # (2, ...): chain 0 goes down, chain 1 goes up
            for k in range(max(len(c) for c in chains)):
                still = [c for c in active if k < len(chains[c])]
                if still != active:  # one chain reached its end: drop its state
                    keep = torch.tensor([active.index(c) for c in still], device=device)
                    states, active = _take_state(states, keep), still
                states = run([chains[c][k] for c in active], states)
        return torch.stack(logits, 0)  # (Z, C+1, S/4, S/4)

    def segment(
        self,
        volume: Tensor,
        out_hw: tuple[int, int],
        resize_chunk: int = 16,
        postprocess: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """(Z, S, S) preprocessed volume -> (Z, H, W) uint8 labels at the original in-plane size."""
        logits = self.propagate(self.encode_volume(volume))
        return logits_to_labels(logits, out_hw, resize_chunk, postprocess)
