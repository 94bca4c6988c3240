"""The backbone (timm ViT with stain-type token), heads, and optimizer parameter groups."""

from foundation.models.backbone import StainViT, build_backbone
from foundation.models.param_groups import param_groups

__all__ = ["StainViT", "build_backbone", "param_groups"]
