"""Convert a torchvision ResNet checkpoint into the .npz that `config.model.init_from` reads.

    python -m arco_jax.models.convert_torchvision --input=resnet101.pth --depth=101 --output=backbone.npz

then train with `--config.model.name=deeplabv3plus --config.model.deeplabv3plus.depth=101
--config.model.init_from=backbone.npz`: the ResNet inside DeepLabV3Plus (its 'backbone')
starts from the checkpoint, parameters and BatchNorm running statistics; ASPP, decoder and
representation head keep their initialisation. Nothing is downloaded: the file is yours.

Input, a ResNet state dict with torchvision's key names ('conv1.weight', 'bn1.running_mean',
'layer3.22.conv2.weight', 'layer1.0.downsample.0.weight', ...):
  .pth / .pt: read with torch.load(weights_only=True) on the CPU. PyTorch is not a dependency of
    arco_jax: this needs it installed; a checkpoint that wraps the state dict under 'state_dict'
    or 'model', or whose keys all start with 'module.' (DataParallel), is unwrapped.
  .npz: the same keys as numpy arrays (np.savez(path, **{k: v.numpy() for k, v in sd.items()})).
  .safetensors is not read: the safetensors package is not installed with arco_jax; save the
    tensors as .npz instead (safetensors.numpy.load_file gives the dict of arrays np.savez takes).
Mapping: conv weights (O, I, kh, kw) -> 'params/backbone/<module>/kernel' (kh, kw, I, O); BatchNorm
weight / bias -> 'params/.../scale' / 'bias', running_mean / running_var -> 'batch_stats/.../mean'
/ 'var'; '<module>' is the torchvision module path with '/' for '.' (layer3/22/conv2,
layer1/0/downsample/0). Ignored, explicitly: 'fc.weight' and 'fc.bias' (no classifier here) and
every BatchNorm 'num_batches_tracked' (flax keeps no such counter). Every other key must map to a
variable of the ResNet of --depth, and every variable must get one, each of the shape the ResNet
needs; otherwise one line names the key (and both shapes). The width multiplier and input
channels are read from conv1.weight, so a width-reduced ResNet converts too.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import flax.traverse_util
import numpy as np

from arco_jax.models.resnet import DEPTHS, STEM_CHANNELS, ResNet

DEFAULT_PREFIX = "backbone"  # where the ResNet sits in DeepLabV3Plus's variables
IGNORED_KEYS = ("fc.weight", "fc.bias")
_KEY = re.compile(r"^(?P<module>conv1|bn1|layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01]))"
                  r"\.(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)$")
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


class ConversionError(ValueError):
    """A checkpoint that does not convert; the message names the file and the key."""


def _is_conv(module: str) -> bool:
    return module.rsplit(".", 1)[-1].startswith("conv") or module.endswith("downsample.0")


def _torch_to_numpy(torch, value) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    value = value.detach()
    return (value.to(torch.float32) if value.is_floating_point() else value).numpy()


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{torchvision key: numpy array} from a .pth/.pt (needs torch) or .npz file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        with open(path, "rb") as f, np.load(f) as stored:
            state = {key: stored[key] for key in stored.files}
    elif suffix in (".pth", ".pt"):
        try:
            import torch  # pylint: disable=import-outside-toplevel  (optional: only this format needs it)
        except ImportError:
            raise ConversionError(f"{path}: reading a .pth checkpoint needs PyTorch, which is not installed "
                                  f"(pip install -r requirements-torch.txt, or save the state dict as .npz)") from None
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
        if not isinstance(loaded, dict):
            raise ConversionError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
        state = {key: _torch_to_numpy(torch, value) for key, value in loaded.items()}
    elif suffix == ".safetensors":
        raise ConversionError(f"{path}: .safetensors is not read (the safetensors package is not an arco_jax "
                              f"dependency); save the tensors as .npz and convert that")
    else:
        raise ConversionError(f"{path}: unknown checkpoint format {suffix!r}; give a .pth, .pt or .npz file")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _flax_name(key: str) -> tuple[str, str, bool] | None:
    """(collection, '/'-joined variable path, whether OIHW -> HWIO) of a mapped key; None if ignored.
    Raises KeyError for a key of no known form."""
    if key in IGNORED_KEYS:
        return None
    match = _KEY.match(key)
    if match is None:
        raise KeyError(key)
    module, leaf = match.group("module"), match.group("leaf")
    path = module.replace(".", "/")
    if _is_conv(module):
        if leaf != "weight":
            raise KeyError(key)  # torchvision's ResNet convolutions have no bias
        return "params", f"{path}/kernel", True
    if leaf == "num_batches_tracked":
        return None
    collection, name = _BN_LEAVES[leaf]
    return collection, f"{path}/{name}", False


def _torch_key(collection: str, path: str) -> str:
    """The torchvision key a ResNet variable comes from (for messages)."""
    module, leaf = path.rsplit("/", 1)
    names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    return f"{module.replace('/', '.')}.{names[leaf]}"


def expected_variables(depth: int, width: float, in_channels: int) -> dict[str, tuple[int, ...]]:
    """{'params/...' or 'batch_stats/...': shape} of the ResNet, from its shapes alone (no compute)."""
    model = ResNet(depth=depth, width=width)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, in_channels)),
                                                  train=False))
    return {key: tuple(leaf.shape) for key, leaf in flax.traverse_util.flatten_dict(variables, sep="/").items()}


def torchvision_to_flax(state: dict[str, np.ndarray], depth: int, prefix: str = DEFAULT_PREFIX,
                        source: str = "state dict") -> tuple[dict[str, np.ndarray], list[str]]:
    """(the init_from arrays {'params/<prefix>/...': float32 array}, the keys ignored) of a torchvision
    ResNet-`depth` state dict; ConversionError (naming `source` and the key) for anything else."""
    if depth not in DEPTHS:
        raise ConversionError(f"--depth must be one of {', '.join(map(str, DEPTHS))}, got {depth!r}")
    if "conv1.weight" not in state or np.ndim(state["conv1.weight"]) != 4:
        raise ConversionError(f"{source}: no 4-D 'conv1.weight': not a torchvision ResNet state dict "
                              f"(keys look like {', '.join(sorted(state)[:3])})")
    stem, in_channels = state["conv1.weight"].shape[:2]
    width = stem / STEM_CHANNELS
    expected = expected_variables(depth, width, int(in_channels))
    name = f"ResNet-{depth}" + (f" at width {width:g}" if width != 1 else "")
    arrays, ignored = {}, []
    for key in sorted(state):
        try:
            mapped = _flax_name(key)
        except KeyError:
            raise ConversionError(f"{source}: key {key!r} is not a torchvision ResNet key this converter maps "
                                  f"(conv1, bn1, layer<1-4>.<block>.conv<k>/bn<k>/downsample.<0|1>, fc)") from None
        if mapped is None:
            ignored.append(key)
            continue
        collection, path, transpose = mapped
        target = f"{collection}/{path}"
        if target not in expected:
            raise ConversionError(f"{source}: key {key!r} names no layer of {name} (is --depth={depth} right?)")
        value = np.asarray(state[key], np.float32)
        value = value.transpose(2, 3, 1, 0) if transpose and value.ndim == 4 else value
        if value.shape != expected[target]:
            want = expected[target]
            want = (want[3], want[2], want[0], want[1]) if transpose else want
            raise ConversionError(f"{source}: key {key!r} has shape {tuple(np.shape(state[key]))}, {name} "
                                  f"needs {tuple(want)}")
        arrays[target] = value
    missing = sorted(set(expected) - set(arrays))
    if missing:
        keys = sorted(_torch_key(*target.split("/", 1)) for target in missing)
        raise ConversionError(f"{source}: {len(missing)} variable(s) of {name} have no key in the file, e.g. "
                              f"{', '.join(keys[:3])}")
    prefixed = {f"{target.split('/', 1)[0]}/{prefix}/{target.split('/', 1)[1]}" if prefix else target: value
                for target, value in arrays.items()}
    return prefixed, ignored


def convert(input_path: str, depth: int, output_path: str, prefix: str = DEFAULT_PREFIX) -> tuple[int, list[str]]:
    """Read `input_path`, map it, write the .npz `output_path`: (arrays written, keys ignored)."""
    arrays, ignored = torchvision_to_flax(read_state_dict(input_path), depth, prefix, source=input_path)
    with open(output_path, "wb") as f:
        np.savez(f, **arrays)
    return len(arrays), ignored


def _define_flags() -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_string("input", None, "torchvision ResNet state dict: .pth/.pt (needs torch) or .npz.")
    flags.DEFINE_integer("depth", None, f"ResNet depth: {', '.join(map(str, DEPTHS))}.")
    flags.DEFINE_string("output", None, "The .npz to write (config.model.init_from).")
    flags.DEFINE_string("prefix", DEFAULT_PREFIX, "Module path of the ResNet in the segmenter's variables "
                        "('backbone' in DeepLabV3Plus; '' for a bare models.resnet.ResNet).")
    flags.mark_flags_as_required(["input", "depth", "output"])


def main(argv) -> None:
    from absl import app, flags  # pylint: disable=import-outside-toplevel

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        written, ignored = convert(f.input, f.depth, f.output, f.prefix)
    except (ConversionError, OSError) as err:
        sys.exit(f"error: {err}")
    tracked = sum(key.endswith("num_batches_tracked") for key in ignored)
    others = [key for key in ignored if not key.endswith("num_batches_tracked")]
    print(f"wrote {written} arrays (ResNet-{f.depth} parameters and BatchNorm statistics) to {f.output}; ignored "
          f"{', '.join(others) or 'no fc'} and {tracked} num_batches_tracked")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
