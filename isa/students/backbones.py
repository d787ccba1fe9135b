"""Light image backbones: timm models used through their feature map (``forward_features``)."""

from __future__ import annotations

import math

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from isa.names import BACKBONES, DEFAULT_BACKBONE  # the names, known to the config without torch

# timm families whose classifier head keeps parameters that forward_features never uses, even with
# num_classes=0. Left in place they would get no gradient (DDP's unused-parameter error) and cost
# optimizer state, so they are replaced by nn.Identity. Keyed by timm class name.
_UNUSED_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "MobileNetV3": ("conv_head", "norm_head", "act2"),  # 960 -> 1280 conv applied after pooling
    "EfficientVit": ("head",),  # MIT EfficientViT: 1x1 conv + Linear + LayerNorm after the map
}

# timm families that refuse global_pool="" (EfficientViT-MIT asserts 'Cannot disable pooling');
# their pooling lives in forward_head only, so leaving it on changes nothing here.
_POOL_REQUIRED_PREFIXES: tuple[str, ...] = ("efficientvit_b", "efficientvit_l")


def _create_timm_model(name: str, pretrained: bool) -> nn.Module:
    kwargs: dict[str, object] = {"pretrained": pretrained, "num_classes": 0}
    if not name.startswith(_POOL_REQUIRED_PREFIXES):
        kwargs["global_pool"] = ""
    model = timm.create_model(name, **kwargs)
    for attr in _UNUSED_HEAD_MODULES.get(type(model).__name__, ()):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
    return model


def _to_feature_map(features: torch.Tensor, num_prefix_tokens: int, name: str) -> torch.Tensor:
    """Brings a forward_features output to (B, C, h, w); token outputs must form a square grid."""
    if features.ndim == 4:
        return features  # (B, C, h, w)
    if features.ndim == 3:  # (B, N, C) token sequence, e.g. a ViT
        tokens = features[:, num_prefix_tokens:]  # (B, h*w, C)
        side = math.isqrt(tokens.shape[1])
        if side * side == tokens.shape[1]:
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    raise ValueError(
        f"backbone {name!r}: forward_features returned shape {tuple(features.shape)}; "
        "expected a (B, C, h, w) feature map or (B, N, C) tokens on a square grid"
    )


class TimmBackbone(nn.Module):
    """A timm model seen through its last feature map, with its own input normalization.

    Takes images with values in [0, 1] and normalizes them with the mean and std of the model's
    ``pretrained_cfg`` (registered as non-persistent buffers: they follow ``.to()`` but are rebuilt
    from the name rather than saved).

    Args:
        name: timm model name; the tested ones are listed in ``BACKBONES``.
        pretrained: Load timm's ImageNet weights (needs the weights locally or network access).
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, pretrained: bool = False) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"unknown timm backbone {name!r}; supported backbones: {', '.join(BACKBONES)}")
        self.name = name
        self.model = _create_timm_model(name, pretrained)
        self.num_features: int = int(self.model.num_features)  # C of the feature map
        self._num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        cfg = self.model.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)  # (1, 3, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Maps images (B, 3, H, W) in [0, 1] to the feature map (B, C, h, w)."""
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)  # (B, 3, H, W)
        features = self.model.forward_features(x)  # (B, C, h, w) for every backbone in BACKBONES
        return _to_feature_map(features, self._num_prefix_tokens, self.name)
