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

To add an architecture: write its module and head, add one `ModelSpec` to `_REGISTRY`, and
give its settings a node `config.model.<name>` in config.base_config (models are plug-ins: the
trainer reads only the fields below). Registered: 'unet' (unet.py, heads.py), 'vnet' (vnet.py,
heads3d.py) and 'deeplabv3plus' (deeplab.py on resnet.py; convert_torchvision.py turns a
torchvision ResNet checkpoint into an init_from file).

Config read: the `config.model` node (ml_collections.ConfigDict or any attribute object):
  name (required), rep_dim (default 496), and the architecture's own sub-config
  `config.model[name]` (e.g. model.unet.features / dropout_rates; defaults when absent).
num_classes and in_channels come from the dataset and are passed by the caller.

Pretrained weights (config.model.init_from): an .npz whose keys are '/'-joined paths into the
segmenter's variables, prefixed by the collection ('params/encoder0/...', 'batch_stats/...');
see load_pretrained / save_variables_npz.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax.numpy as jnp
import numpy as np

from arco_jax.models import resnet
from arco_jax.models.deeplab import ASPP_RATES, DeepLabHead, DeepLabV3Plus
from arco_jax.models.deeplab import feature_strides as deeplab_feature_strides
from arco_jax.models.heads import UNET_REP_DIM, FPNHead, Projector
from arco_jax.models.heads3d import FPNHead3D, vnet_level_dims
from arco_jax.models.unet import NUM_LEVELS, UNet
from arco_jax.models.vnet import NUM_DOWNSAMPLINGS, VNET_FEATURE_STRIDES, VNet

Dtype = Any
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class BuildArgs:
    """What every architecture gets besides its own sub-config: the dataset's sizes and the dtype."""

    num_classes: int
    in_channels: int
    rep_dim: int
    dtype: Dtype


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture's segmenter and the head fed by its features.

    Each callable takes the architecture's own sub-config (config.model[name], None when absent).
    feature_strides: the stride of each feature map the segmenter returns, in its order (so a
      head, sampler or validator can size things without tracing); input_multiple: what H and
      W (D) must be multiples of.
    check: (field, problem) pairs for settings that cannot work, field relative to config.model.
    spatial_rank: the spatial axes of its inputs (2 images, 3 volumes): a dataset of another
      rank is refused (`check_rank`).
    """

    segmenter: Callable[[Any, BuildArgs], nn.Module]
    head: Callable[[Any, BuildArgs], nn.Module]
    feature_strides: Callable[[Any], tuple[int, ...]]
    input_multiple: Callable[[Any], int]
    check: Callable[[Any], list[tuple[str, str]]] = lambda sub: []
    spatial_rank: int = 2


def _field(config: Any, key: str, default: Any = _MISSING) -> Any:
    value = getattr(config, key, default) if config is not None else default
    if value is _MISSING:
        raise ValueError(f"model config is missing the required field '{key}'")
    return value


def _unet_fields(sub: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    defaults = UNet()
    return (tuple(_field(sub, "features", defaults.features)),
            tuple(_field(sub, "dropout_rates", defaults.dropout_rates)))


def _check_unet(sub: Any) -> list[tuple[str, str]]:
    features, dropout_rates = _unet_fields(sub)
    if len(features) != NUM_LEVELS or len(dropout_rates) != len(features):
        return [("unet.features", f"the UNet needs {NUM_LEVELS} feature widths and as many "
                 f"unet.dropout_rates, got features={features}, dropout_rates={dropout_rates}")]
    return []


def _build_unet(sub: Any, args: BuildArgs) -> nn.Module:
    problems = _check_unet(sub)
    if problems:
        raise ValueError(f"model.{problems[0][0]}: {problems[0][1]}")
    features, dropout_rates = _unet_fields(sub)
    return UNet(num_classes=args.num_classes, in_channels=args.in_channels, features=features,
                dropout_rates=dropout_rates, dtype=args.dtype)


def _build_unet_head(sub: Any, args: BuildArgs) -> nn.Module:
    features, _ = _unet_fields(sub)
    return FPNHead(feature_dims=tuple(reversed(features)), output_dim=args.rep_dim, dtype=args.dtype)


def _unet_strides(sub: Any) -> tuple[int, ...]:
    """Bottleneck at H/16, then each decoder stage up to full resolution (UNet.__call__)."""
    return tuple(2 ** level for level in range(NUM_LEVELS - 1, -1, -1))


def _vnet_fields(sub: Any) -> tuple[Any, Any]:
    defaults = VNet()
    return _field(sub, "n_filters", defaults.n_filters), _field(sub, "dropout", defaults.dropout)


def _check_vnet(sub: Any) -> list[tuple[str, str]]:
    n_filters, dropout = _vnet_fields(sub)
    problems = []
    if isinstance(n_filters, bool) or not isinstance(n_filters, (int, np.integer)) or n_filters < 1:
        problems.append(("vnet.n_filters", f"must be a positive integer (the base width), got {n_filters!r}"))
    if not isinstance(dropout, (bool, np.bool_)):
        problems.append(("vnet.dropout", f"must be true or false (the reference's has_dropout), got {dropout!r}"))
    return problems


def _build_vnet(sub: Any, args: BuildArgs) -> nn.Module:
    problems = _check_vnet(sub)
    if problems:
        raise ValueError(f"model.{problems[0][0]}: {problems[0][1]}")
    n_filters, dropout = _vnet_fields(sub)
    return VNet(num_classes=args.num_classes, in_channels=args.in_channels, n_filters=int(n_filters),
                dropout=bool(dropout), dtype=args.dtype)


def _build_vnet_head(sub: Any, args: BuildArgs) -> nn.Module:
    n_filters, _ = _vnet_fields(sub)
    return FPNHead3D(level_dims=vnet_level_dims(int(n_filters)), output_dim=args.rep_dim, dtype=args.dtype)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _deeplab_fields(sub: Any) -> tuple[Any, Any, Any]:
    defaults = DeepLabV3Plus()
    return (_field(sub, "depth", defaults.depth), _field(sub, "output_stride", defaults.output_stride),
            _field(sub, "width", defaults.width), _field(sub, "channels", defaults.channels))


def _check_deeplab(sub: Any) -> list[tuple[str, str]]:
    depth, output_stride, width, channels = _deeplab_fields(sub)
    problems = []
    if not _is_int(depth) or depth not in resnet.DEPTHS:
        problems.append(("deeplabv3plus.depth", f"must be one of {', '.join(map(str, resnet.DEPTHS))} (torchvision's "
                                                f"ResNets), got {depth!r}"))
    if not _is_int(output_stride) or output_stride not in ASPP_RATES:
        problems.append(("deeplabv3plus.output_stride", f"must be 16 (ASPP rates 6/12/18) or 8 (12/24/36), got "
                                                        f"{output_stride!r}"))
    width_problem = resnet.width_problem(width)
    if width_problem:
        problems.append(("deeplabv3plus.width", width_problem))
    if not _is_int(channels) or channels < 1:
        problems.append(("deeplabv3plus.channels", f"must be a positive whole number of channels (256: ReCo's ASPP "
                                                   f"and decoder), got {channels!r}"))
    return problems


def _build_deeplab(sub: Any, args: BuildArgs) -> nn.Module:
    problems = _check_deeplab(sub)
    if problems:
        raise ValueError(f"model.{problems[0][0]}: {problems[0][1]}")
    depth, output_stride, width, channels = _deeplab_fields(sub)
    return DeepLabV3Plus(num_classes=args.num_classes, in_channels=args.in_channels, depth=int(depth),
                         output_stride=int(output_stride), width=float(width), channels=int(channels),
                         dtype=args.dtype)


def _build_deeplab_head(sub: Any, args: BuildArgs) -> nn.Module:
    return DeepLabHead(hidden_dim=int(_deeplab_fields(sub)[3]), output_dim=args.rep_dim, dtype=args.dtype)


_REGISTRY: dict[str, ModelSpec] = {
    "unet": ModelSpec(segmenter=_build_unet, head=_build_unet_head, feature_strides=_unet_strides,
                      input_multiple=lambda sub: 2 ** (NUM_LEVELS - 1), check=_check_unet),
    "vnet": ModelSpec(segmenter=_build_vnet, head=_build_vnet_head, feature_strides=lambda sub: VNET_FEATURE_STRIDES,
                      input_multiple=lambda sub: 2 ** NUM_DOWNSAMPLINGS, check=_check_vnet, spatial_rank=3),
    # Any input size: PyTorch's ceil arithmetic and align_corners upsampling (ReCo trains on 321 px).
    "deeplabv3plus": ModelSpec(segmenter=_build_deeplab, head=_build_deeplab_head,
                               feature_strides=lambda sub: deeplab_feature_strides(int(_deeplab_fields(sub)[1])),
                               input_multiple=lambda sub: 1, check=_check_deeplab),
}


def known_models() -> tuple[str, ...]:
    """The registered names, in the order registered (messages list the original models first)."""
    return tuple(_REGISTRY)


def _model_node(config: Any) -> Any:
    """config.model of a full config, or that node itself."""
    return getattr(config, "model", None) if hasattr(config, "model") and hasattr(config, "data") else config


def _spec(model_config: Any) -> tuple[ModelSpec, Any]:
    name = _field(model_config, "name")
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(known_models())}")
    return _REGISTRY[name], getattr(model_config, name, None)


def _args(model_config: Any, num_classes: int, in_channels: int, dtype: Dtype) -> BuildArgs:
    return BuildArgs(num_classes=int(num_classes), in_channels=int(in_channels),
                     rep_dim=int(_field(model_config, "rep_dim", UNET_REP_DIM)), dtype=dtype)


def build_segmenter(model_config: Any, num_classes: int, in_channels: int, dtype: Dtype = jnp.float32) -> nn.Module:
    """The segmenter named by `model_config.name` (config.model), returning (logits, features)."""
    spec, sub = _spec(model_config)
    return spec.segmenter(sub, _args(model_config, num_classes, in_channels, dtype))


def build_head(model_config: Any, num_classes: int, in_channels: int, dtype: Dtype = jnp.float32) -> nn.Module:
    """The representation head that consumes that segmenter's features tuple."""
    spec, sub = _spec(model_config)
    return spec.head(sub, _args(model_config, num_classes, in_channels, dtype))


def build_projector(model_config: Any, dtype: Dtype = jnp.float32) -> nn.Module:
    """The student-only projector on rep_dim-channel representations."""
    _spec(model_config)
    return Projector(dim=int(_field(model_config, "rep_dim", UNET_REP_DIM)), dtype=dtype)


def feature_strides(config: Any) -> tuple[int, ...]:
    """Stride of each feature map the segmenter returns (config: the full config or config.model)."""
    spec, sub = _spec(_model_node(config))
    return tuple(spec.feature_strides(sub))


def input_multiple(config: Any) -> int:
    """What every spatial input size must be a multiple of (config: the full config or config.model)."""
    spec, sub = _spec(_model_node(config))
    return int(spec.input_multiple(sub))


def check(config: Any) -> list[tuple[str, str]]:
    """(field, problem) pairs, field relative to config.model, for settings the model cannot build."""
    model_config = _model_node(config)
    name = getattr(model_config, "name", None)
    if name not in _REGISTRY:
        return [("name", f"{name!r} is not a known model; known names: {', '.join(known_models())}")]
    spec, sub = _spec(model_config)
    return list(spec.check(sub))


def check_rank(config: Any, spatial_rank: int) -> list[tuple[str, str]]:
    """A (field, problem) pair when the model's input rank is not the dataset's `spatial_rank`."""
    model_config = _model_node(config)
    if getattr(model_config, "name", None) not in _REGISTRY:
        return []
    spec, _ = _spec(model_config)
    if spec.spatial_rank == spatial_rank:
        return []
    kinds = {2: "2-D images", 3: "3-D volumes"}
    return [("name", f"{model_config.name!r} takes {kinds.get(spec.spatial_rank, spec.spatial_rank)}; this "
                     f"dataset's samples are {kinds.get(spatial_rank, spatial_rank)} (data.spatial_rank "
                     f"{spatial_rank})")]


def save_variables_npz(variables: Any, path: str) -> int:
    """Write a segmenter's variables ({'params': ..., 'batch_stats': ...}) as the .npz that
    config.model.init_from reads; returns the number of arrays written."""
    flat = flax.traverse_util.flatten_dict(dict(variables), sep="/")
    with open(path, "wb") as f:
        np.savez(f, **{key: np.asarray(value) for key, value in flat.items()})
    return len(flat)


def load_pretrained(variables: Any, path: str) -> tuple[dict, int]:
    """`variables` with every leaf named in the .npz at `path` replaced by the stored array (a host
    numpy array, of the dtype of the leaf it replaces); leaves the file does not name keep their values. Returns
    (variables, number of leaves loaded). A key that names no leaf, or a shape that differs,
    raises ValueError: silently training half-initialised is worse than failing."""
    flat = flax.traverse_util.flatten_dict(dict(variables), sep="/")
    with open(path, "rb") as f, np.load(f) as stored:
        arrays = {key: stored[key] for key in stored.files}
    unknown = sorted(set(arrays) - set(flat))
    if unknown:
        near = sorted(flat)[:3]
        raise ValueError(f"init_from {path}: {len(unknown)} key(s) match no variable of the segmenter, e.g. "
                         f"{', '.join(unknown[:3])} (keys look like {', '.join(near)})")
    bad = [f"{key} {arrays[key].shape} vs {tuple(flat[key].shape)}" for key in sorted(arrays)
           if tuple(arrays[key].shape) != tuple(flat[key].shape)]
    if bad:
        raise ValueError(f"init_from {path}: {len(bad)} shape mismatch(es) (file vs model): {'; '.join(bad[:3])}")
    for key, value in arrays.items():
        flat[key] = np.asarray(value, dtype=np.dtype(flat[key].dtype))  # Host arrays: the caller places them.
    return flax.traverse_util.unflatten_dict(flat, sep="/"), len(arrays)


__all__ = [
    "BuildArgs",
    "DeepLabHead",
    "DeepLabV3Plus",
    "FPNHead",
    "ModelSpec",
    "Projector",
    "UNet",
    "build_head",
    "build_projector",
    "build_segmenter",
    "check",
    "feature_strides",
    "input_multiple",
    "known_models",
    "load_pretrained",
    "save_variables_npz",
]
