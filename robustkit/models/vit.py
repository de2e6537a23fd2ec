"""A small Vision Transformer that exposes its attention maps.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021; pre-norm blocks as in Xiong et al., "On Layer Normalization in the
Transformer Architecture", ICML 2020::

    x = x + attn(norm1(x))
    x = x + mlp(norm2(x))

:class:`Attention` computes ``softmax(Q K^T / sqrt(d_head))`` explicitly (no fused
``scaled_dot_product_attention``) so the maps - ``N x heads x T x T`` with
``T = 1 + num_patches`` and token 0 the CLS token - can be returned by
``forward(x, return_attention=True)``, read by forward hooks on ``blocks[i].attn`` (whose
output is the tuple ``(out, attn)``), or kept on the module as ``last_attention`` when
``keep_attention`` is set (attention-based backdoor defenses and visualizations use this).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..registry import MODELS
from .normalization import Normalize, default_stats


class Attention(nn.Module):
    """Multi-head self-attention returning ``(output N x T x dim, attention N x heads x T x T)``.

    The attention map is the post-softmax one (rows sum to 1, before dropout). When
    ``keep_attention`` is ``True`` the last map is also stored, detached, in ``last_attention``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or dim % heads:
            raise InputError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.keep_attention:
            self.last_attention = attn.detach()
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj_drop(self.proj(out)), attn

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, keep_attention={self.keep_attention}"


class Block(nn.Module):
    """Pre-norm transformer block; ``forward`` returns ``(tokens, attention map)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, attn = self.attn(self.norm1(x))
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, attn


@MODELS.register("small_vit")
class SmallViT(nn.Module):
    """ViT for small images: conv patch embedding, CLS token, learned positions, ``depth`` blocks.

    ``forward(x)`` returns logits; ``forward(x, return_attention=True)`` returns
    ``(logits, [attention map of each block])``. ``features(x)`` is the final-norm CLS
    embedding (N x dim), the input of ``head``.

    The defaults (dim 64, depth 4, 4 heads, patch 4 -> 65 tokens on 32x32 inputs) train on
    CPU in a few seconds per epoch on ~1.4k images; ``dim=128, depth=6`` is the larger
    variant (about 4x slower).
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        for key, value in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                           ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")
        if image_size % patch_size:
            raise InputError(
                f"image_size ({image_size}) must be divisible by patch_size ({patch_size});"
                f" e.g. patch_size={next(p for p in range(patch_size, 0, -1) if image_size % p == 0)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout!r}")
        mean, std = default_stats(in_channels, mean, std)
        self.config = {"image_size": image_size, "patch_size": patch_size, "in_channels": in_channels,
                       "num_classes": num_classes, "dim": dim, "depth": depth, "heads": heads,
                       "mlp_ratio": mlp_ratio, "dropout": dropout, "mean": mean, "std": std}
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.num_tokens = 1 + self.num_patches
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        # zero CLS token, N(0, 0.02) positions, PyTorch's default init elsewhere (timm's
        # trunc-normal(0.02) for every linear layer trained slower on small data in our runs)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def get_classifier(self) -> nn.Linear:
        """The last layer, ``head`` (timm-style accessor shared by robustkit models)."""
        return self.head

    def set_keep_attention(self, flag: bool = True) -> "SmallViT":
        """Store (or stop storing) each block's map in ``blocks[i].attn.last_attention``."""
        for blk in self.blocks:
            blk.attn.keep_attention = bool(flag)
            if not flag:
                blk.attn.last_attention = None
        return self

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 4 and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise InputError(
                f"SmallViT was built for {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}"
                f" (resize the input or build the model with image_size={x.shape[-1]})"
            )
        tok = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tok.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, tok], dim=1) + self.pos_embed)

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
        """Logits, or ``(logits, [N x heads x T x T map per block])`` with ``return_attention``."""
        feats, maps = self._encode(x)
        logits = self.head(feats)
        return (logits, maps) if return_attention else logits
