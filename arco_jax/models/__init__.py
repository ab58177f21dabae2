"""Model registry: build the segmenter, its representation head and the projector from config.

Contract every registered architecture keeps, so the trainer never names one:
  segmenter.apply(variables, images, train=bool, ...) -> (logits, features)
    images (B, H, W, in_channels); logits (B, H, W, num_classes) float32;
    features: a tuple of feature maps, coarsest first, that the architecture's head consumes.
    State: 'params' and 'batch_stats' collections; train=True uses the 'dropout' rng and
    needs mutable=['batch_stats'].
  head.apply(head_variables, features) -> (B, H', W', rep_dim) pixel representations, and
    the sparse methods (see heads.FPNHead): 'coarse', 'fine_at_pixels' / 'at_pixels'
    (representations at chosen pixels only), 'region_sums' + 'output' (region means).
  projector.apply(projector_variables, reps) -> same shape; works on (..., rep_dim).

To add an architecture (DeepLabv3+, a 3D VNet): write its module and head, and add one
`ModelSpec` to `_REGISTRY`.

Config fields read (ml_collections.ConfigDict or any attribute object):
  name (required), num_classes (required), in_channels (required),
  features, dropout_rates (architecture defaults when absent), rep_dim (default 496).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from arco_jax.models.heads import UNET_REP_DIM, FPNHead, Projector
from arco_jax.models.unet import UNet

Dtype = Any
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture's segmenter and the head fed by its features."""

    segmenter: Callable[[Any, Dtype], nn.Module]
    head: Callable[[Any, Dtype], nn.Module]


def _field(config: Any, key: str, default: Any = _MISSING) -> Any:
    value = getattr(config, key, default)
    if value is _MISSING:
        raise ValueError(f"model config is missing the required field '{key}'")
    return value


def _build_unet(config: Any, dtype: Dtype) -> nn.Module:
    defaults = UNet()
    features = tuple(_field(config, "features", defaults.features))
    dropout_rates = tuple(_field(config, "dropout_rates", defaults.dropout_rates))
    if len(features) != len(defaults.features) or len(dropout_rates) != len(features):
        raise ValueError(
            f"model 'unet' needs {len(defaults.features)} features and as many dropout_rates, "
            f"got features={features}, dropout_rates={dropout_rates}"
        )
    return UNet(
        num_classes=int(_field(config, "num_classes")),
        in_channels=int(_field(config, "in_channels")),
        features=features,
        dropout_rates=dropout_rates,
        dtype=dtype,
    )


def _build_unet_head(config: Any, dtype: Dtype) -> nn.Module:
    features = tuple(_field(config, "features", UNet().features))
    return FPNHead(
        feature_dims=tuple(reversed(features)),
        output_dim=int(_field(config, "rep_dim", UNET_REP_DIM)),
        dtype=dtype,
    )


_REGISTRY: dict[str, ModelSpec] = {
    "unet": ModelSpec(segmenter=_build_unet, head=_build_unet_head),
}


def known_models() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _spec(config: Any) -> ModelSpec:
    name = _field(config, "name")
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(known_models())}")
    return _REGISTRY[name]


def build_segmenter(config: Any, dtype: Dtype = jnp.float32) -> nn.Module:
    """The segmenter named by `config.name`, returning (logits, features)."""
    return _spec(config).segmenter(config, dtype)


def build_head(config: Any, dtype: Dtype = jnp.float32) -> nn.Module:
    """The representation head that consumes that segmenter's features tuple."""
    return _spec(config).head(config, dtype)


def build_projector(config: Any, dtype: Dtype = jnp.float32) -> nn.Module:
    """The student-only projector on rep_dim-channel representations."""
    _spec(config)
    return Projector(dim=int(_field(config, "rep_dim", UNET_REP_DIM)), dtype=dtype)


__all__ = [
    "FPNHead",
    "ModelSpec",
    "Projector",
    "UNet",
    "build_head",
    "build_projector",
    "build_segmenter",
    "known_models",
]
