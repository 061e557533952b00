"""Swin Transformer image encoder with the parameter names of CMP's `vision_encoder` (Microsoft's Swin v1 layout).

timm's current Swin puts each stage's patch merging at the start of the next stage (`layers.1.downsample`) and
names differ, so the blocks are written here: `layers.i.downsample` ends stage i, exactly as in cmp.pth. Output: the
final-normed patch tokens with their mean prepended as token 0 ([B, 1 + grid_h * grid_w, width]).

Inputs may be rectangular (APTM: 384 x 128): sizes are `int` (square) or `(height, width)`; a stage whose shorter
side fits in one window uses that side as its window and does not shift, as in the original code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Size = int | tuple[int, int]


def as_hw(size: Size) -> tuple[int, int]:
    """(height, width) of a square side or an (h, w) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only; identity in eval)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window: int) -> torch.Tensor:
    """[window**2, window**2] index into the (2*window-1)**2-row bias table (Swin v1 rule)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window, window, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`."""
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def shifted_window_mask(grid: Size, window: int, shift: int) -> torch.Tensor:
    """[nW, window**2, window**2] additive mask (0 within a region, -100 across) for cyclic-shifted windows."""
    img = torch.zeros(1, *as_hw(grid), 1)
    cnt = 0
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in bounds:
        for ws in bounds:
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, window).view(-1, window * window)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.window = window
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm residual. Odd blocks shift unless the grid's shorter side fits in
    one window."""

    def __init__(self, dim: int, grid: Size, heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.grid = as_hw(grid)
        if min(self.grid) <= window:
            # The shorter side is one window: no shift (stage 3 of Swin-B at 224 px; stages 2-3 of APTM at 384x128).
            window, shift = min(self.grid), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Persistent like the original (cmp.pth carries it); recomputed identically, so loading it is harmless.
        self.register_buffer("attn_mask", shifted_window_mask(grid, window, shift) if shift > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        (gh, gw), w, s = self.grid, self.window, self.shift
        shortcut = x
        x = self.norm1(x).view(b, gh, gw, c)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        wins = window_partition(x, w).view(-1, w * w, c)
        wins = self.attn(wins, self.attn_mask)
        x = window_reverse(wins.view(-1, w, w, c), w, gh, gw)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, gh * gw, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order x00, x10, x01, x11) -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""

    def __init__(self, dim: int, grid: Size) -> None:
        super().__init__()
        self.grid = as_hw(grid)
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, *self.grid, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """`depth` blocks at one resolution, then (except the last stage) patch merging."""

    def __init__(
        self,
        dim: int,
        grid: Size,
        depth: int,
        heads: int,
        window: int,
        mlp_ratio: float,
        drop_paths: list[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, grid, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, grid) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    """Conv patchify (kernel = stride = patch) + LayerNorm."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinEncoder(nn.Module):
    """Swin v1 backbone returning [B, 1 + P, width]: mean of the P final-normed patch tokens, then the tokens."""

    def __init__(
        self,
        image_size: Size,
        patch_size: int,
        embed_dim: int,
        depths: tuple[int, ...],
        heads: tuple[int, ...],
        window: int,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        n = sum(depths)
        # Stochastic-depth rate rising linearly over all blocks (plain floats: works under the meta device too).
        dpr = [drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        height, width = as_hw(image_size)
        grid = (height // patch_size, width // patch_size)
        self.layers = nn.ModuleList()
        for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    embed_dim * 2**i,
                    (grid[0] // 2**i, grid[1] // 2**i),
                    depth,
                    h,
                    window,
                    mlp_ratio,
                    dpr[start : start + depth],
                    downsample=i < len(depths) - 1,
                )
            )
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = as_hw(self.image_size)
        if tuple(x.shape[-2:]) != (h, w):
            raise ValueError(f"expected {h}x{w} input, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        # Same op as the reference (AdaptiveAvgPool1d(1)) so the CLS token matches bit for bit.
        return torch.cat([adaptive_pool_tokens(x, 1), x], dim=1)


def adaptive_pool_tokens(tokens: torch.Tensor, bins: int) -> torch.Tensor:
    """AdaptiveAvgPool1d(bins) over the token axis of [B, L, C] -> [B, bins, C] (PyTorch's overlapping bins)."""
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), bins).transpose(1, 2)
