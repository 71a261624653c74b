"""TinyViT-5M image encoder in LiteMedSAM's layout (MobileSAM's TinyViT with a stride-1 patch embedding).

LiteMedSAM (the MedSAM team's distilled model, Apache-2.0) pairs this encoder with segment-anything's own
prompt encoder and mask decoder. Its published implementation imports timm, and timm needs torchvision,
which does not install beside sautomed's CPU torch; so the encoder is written here, with LiteMedSAM's
state-dict names, and tested key by key against the real checkpoint (tests/models/test_tiny_vit.py) and
op by op through the zero-shot box test on real MR (tests/test_litemedsam_real.py).

Layout (input S x S, S a multiple of 4; LiteMedSAM was trained at S = 256):

```
x (N, 3, S, S) in [0, 1]
patch_embed: Conv1x1-BN (3 -> 32), GELU, Conv1x1-BN (32 -> 64)           (N, 64, S, S)      no downsampling
layers.0: 2 MBConv (64, expand 4) + PatchMerging (64 -> 128, stride 2)     (N, (S/2)^2, 128)
layers.1: 2 TinyViT blocks (4 heads, window 7) + merging (-> 160, s 2)    (N, (S/4)^2, 160)
layers.2: 6 TinyViT blocks (5 heads, window 14) + merging (-> 320, s 1)   (N, (S/4)^2, 320)
layers.3: 2 TinyViT blocks (10 heads, window 7)                           (N, (S/4)^2, 320)
neck: Conv1x1 (320 -> 256), LayerNorm2d, Conv3x3 (256 -> 256), LayerNorm2d  (N, 256, S/4, S/4)
```

A TinyViT block is windowed attention (pre-norm inside the attention, a learned bias per head and per
relative offset |dy|, |dx| inside the window; the grid zero-padded to whole windows) + residual, a 3x3
depthwise Conv-BN, then an MLP (pre-norm inside) + residual. The model has no encoder object in SAM's sense;
the network calls it as ``features = encoder(x)``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sautomed.models.sam.upstream import LayerNorm2d

EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
MERGE_STRIDES = (2, 2, 1)  # patch merging after layers 0, 1, 2
OUT_CHANS = 256


class PretrainedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running (pretrained) statistics and never updates them,
    whatever its ``training`` flag says. A flag is not enough: Lightning restores every submodule's flag
    after validation by assignment, and a module starts a fit with every flag set, so BatchNorm ran on batch
    statistics in the fits before 2026-12-02 (a few neighbouring slices of one volume) and its running
    statistics drifted, so the encoder seen at inference was not the one trained on. The affine weight and
    bias stay parameters (they train with ``encoder_finetune: full``); the state-dict names are BatchNorm2d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (state-dict names ``c.*`` and ``bn.*``).

    Run as one convolution with the normalisation folded into its weight and bias (the same function, since
    the statistics are fixed; gradients still reach the conv weight and the affine BatchNorm parameters):
    one pass over the activations instead of two (fold + channels-last: 0.56-0.69 -> 0.43 s per slice at
    S = 128 on a 2-core CPU, measured 2026-12-02).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", PretrainedBatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.c, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (cout,)
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(
            x, conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding, 1, conv.groups
        )


class PatchEmbed(nn.Module):
    """Two 1x1 Conv-BN layers with a GELU between: (N, 3, S, S) -> (N, dim, S, S)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU. (N, C, H, W) -> same."""

    def __init__(self, dim: int, expand: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 Conv-BN, GELU, 3x3 depthwise Conv-BN (stride s), GELU, 1x1 Conv-BN.

    (N, C, H, W) -> (N, C', H/s, W/s).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear (the norm is inside, as in TinyViT)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per head and relative offset.

    ``qkv`` is one fused Linear (dim -> 3 dim; per head q, k, v of dim/heads each, interleaved by head), so
    LoRA wraps it exactly as it wraps SAM's ViT qkv.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape  # (windows, tokens per window, dim)
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        # softmax(q k^T * scale + bias) v written out: with a float mask, scaled_dot_product_attention takes
        # its math path on the CPU and first scans the mask for -inf (a tenth of the time here)
        Hd, d = self.num_heads, self.head_dim
        scores = torch.baddbmm(
            bias.expand(B, -1, -1, -1).reshape(B * Hd, N, N),
            (q * self.scale).reshape(B * Hd, N, d),
            k.reshape(B * Hd, N, d).transpose(1, 2),
        )  # (B*heads, N, N)
        x = torch.bmm(scores.softmax(-1), v.reshape(B * Hd, N, d)).view(B, Hd, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention + residual, 3x3 depthwise Conv-BN, MLP + residual. (N, H, W, C) -> same."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        N, H, W, C = x.shape
        w = self.window
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x  # zero-pad to whole windows
        pH, pW = H + pad_b, W + pad_r
        y = y.view(N, pH // w, w, pW // w, w, C).transpose(2, 3).reshape(-1, w * w, C)  # (N*nW, w*w, C)
        y = self.attn(y)
        y = y.view(N, pH // w, pW // w, w, w, C).transpose(2, 3).reshape(N, pH, pW, C)[:, :H, :W]
        x = x + y
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (N, H, W, C)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then patch merging. (N, C, H, W) -> (N, C', H/s, W/s)."""

    def __init__(self, dim: int, depth: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """An attention stage: TinyViT blocks, then patch merging (not in the last stage). Channels first."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window: int, out_dim: int | None, stride: int
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: Tensor, checkpointing: bool = False) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        for blk in self.blocks:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = x.permute(0, 3, 1, 2)  # (N, C, H, W)
        return self.downsample(x) if self.downsample is not None else x


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder: (N, 3, S, S) in [0, 1] -> (N, 256, S/4, S/4).

    Unlike SAM's ViT it takes the image scaled to [0, 1] with no pixel mean / std (MedSAM's preprocessing).
    """

    pixel_range = "unit"  # the network feeds [0, 1] images, not SAM's normalised 0..255

    def __init__(self, out_chans: int = OUT_CHANS) -> None:
        super().__init__()
        d = EMBED_DIMS
        self.patch_embed = PatchEmbed(d[0])
        layers: list[nn.Module] = [ConvLayer(d[0], DEPTHS[0], d[1], MERGE_STRIDES[0])]
        for i in range(1, 4):
            out = d[i + 1] if i < 3 else None
            stride = MERGE_STRIDES[i] if i < 3 else 1
            layers.append(BasicLayer(d[i], DEPTHS[i], NUM_HEADS[i], WINDOW_SIZES[i], out, stride))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(d[3], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.grad_checkpointing = False

    @property
    def downsample(self) -> int:
        """Input side over feature side (4)."""
        return 4

    def attention_blocks(self) -> list[TinyViTBlock]:
        """Every block with an ``attn.qkv`` (where LoRA goes)."""
        return [b for layer in self.layers[1:] for b in layer.blocks]

    def forward(self, x: Tensor) -> Tensor:
        # channels-last: the convolutions run faster on the CPU, and the blocks' (N, H, W, C) views are free
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # (N, 64, S, S)
        x = self.layers[0](x)  # (N, 128, S/2, S/2)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers[1:]:
            x = layer(x, ckpt)  # (N, 160, S/4, S/4), then (N, 320, S/4, S/4) twice
        return self.neck(x).contiguous()  # (N, 256, S/4, S/4), standard layout
