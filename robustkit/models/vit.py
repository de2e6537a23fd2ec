"""A small Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021)
that exposes its attention maps.

Pre-norm blocks ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. ``Attention`` computes
``softmax(Q K^T / sqrt(d))`` explicitly (no fused SDPA) so the maps can be returned by
``forward(x, return_attention=True)`` or read by hooks; token 0 is the CLS token.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..registry import MODELS
from .normalization import Normalize, default_stats


class Attention(nn.Module):
    """Multi-head self-attention returning ``(output, attention N x heads x T x T)``.

    When ``keep_attention`` is set, the last map is also stored in ``last_attention``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise InputError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.keep_attention:
            self.last_attention = attn.detach()
        out = (self.drop(attn) @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out), attn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, attn = self.attn(self.norm1(x))
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, attn


@MODELS.register("small_vit")
class SmallViT(nn.Module):
    """ViT for small images: conv patch embedding, CLS token, learned positions, ``depth`` blocks."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise InputError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        mean, std = default_stats(in_channels, mean, std)
        self.config = {"image_size": image_size, "patch_size": patch_size, "in_channels": in_channels,
                       "num_classes": num_classes, "dim": dim, "depth": depth, "heads": heads,
                       "mlp_ratio": mlp_ratio, "dropout": dropout, "mean": mean, "std": std}
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise InputError(f"SmallViT was built for {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        tok = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tok.shape[0], -1, -1)
        return torch.cat([cls, tok], dim=1) + self.pos_embed

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self._tokens(x)
        maps = []
        for blk in self.blocks:
            h, attn = blk(h)
            maps.append(attn)
        return self.norm(h)[:, 0], maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final-norm CLS embedding (N x dim), the input of ``head``."""
        return self._encode(x)[0]

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        feats, maps = self._encode(x)
        logits = self.head(feats)
        return (logits, maps) if return_attention else logits
