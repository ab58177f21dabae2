"""The plain UNet train step in PyTorch, to time against `python -m arco_jax.benchmark --cases=unet:S`.

The network is the SSL4MIS 2-D UNet that arco_jax.models.unet mirrors (channels 16-256, dropout
0.05-0.5 after each encoder block's first layer, 2x2 transposed-conv upsampling, concat, a 3x3
output conv; BatchNorm momentum 0.1, LeakyReLU 0.01), with the step SSL4MIS's
train_fully_supervised_2D.py takes: CE + Dice (softmax, squared denominators, background
included), SGD with Nesterov momentum 0.9 and weight decay 1e-4 (arco_jax's optimizer, the ARCO
reference's), on random images and labels. The
arco_jax step also updates the EMA teacher and runs the divergence guard, which this one does
not. Channels-last memory format and cuDNN autotuning are on, as a tuned PyTorch script would
have them; `--compile` adds torch.compile.

  python benchmarks/torch_unet_step.py --size=256 --batch=8 --dtype=float32 --out=torch_unet_256.json

Times are the median of `--repeats` steps after `--warmup` steps, each synchronised; the JSON
names the device and versions. Needs only torch and numpy (pip install -r requirements-torch.txt);
nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

FEATURES = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)
NUM_CLASSES = 4
DICE_SMOOTH = 1e-5


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01))

    def forward(self, x):
        return self.layers(x)


class UpBlock(nn.Module):
    def __init__(self, coarse: int, skip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(coarse, skip, 2, stride=2)
        self.block = ConvBlock(2 * skip, cout, 0.0)

    def forward(self, coarse, skip):
        return self.block(torch.cat([skip, self.up(coarse)], dim=1))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        widths = (in_channels, *FEATURES)
        self.encoders = nn.ModuleList(ConvBlock(widths[i], widths[i + 1], DROPOUT[i]) for i in range(5))
        self.decoders = nn.ModuleList(UpBlock(FEATURES[level + 1], FEATURES[level], FEATURES[level])
                                      for level in range(3, -1, -1))
        self.out_conv = nn.Conv2d(FEATURES[0], num_classes, 3, padding=1)

    def forward(self, x):
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            x = decoder(x, skip)
        return self.out_conv(x)


def dice_loss(logits, labels):
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
    axes = (0, 2, 3)
    intersect = (probs * onehot).sum(axes)
    denominator = (probs * probs).sum(axes) + (onehot * onehot).sum(axes)
    return (1.0 - (2.0 * intersect + DICE_SMOOTH) / (denominator + DICE_SMOOTH)).mean()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(size: int, batch: int, dtype: str, repeats: int, warmup: int, compiled: bool, device: str) -> dict:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = UNet().to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    images = torch.rand(batch, 1, size, size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    autocast = dtype == "bfloat16"
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels) + dice_loss(logits, labels)
        loss.backward()
        optimizer.step()
        return loss

    def synchronise():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    synchronise()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    synchronise()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        synchronise()
        times.append(time.perf_counter() - start)
    result = {"case": f"torch_unet:{size}", "size": size, "batch": batch, "dtype": dtype, "torch_compile": compiled,
              "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
              "torch": torch.__version__, "python": sys.version.split()[0], "parameters": parameter_count(model),
              "first_step_s": first_s, "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
              "loss": float(loss.detach())}
    if device.startswith("cuda"):
        result["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="labeled images a step (arco_jax's unet case: 4 + 4)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: autocast, parameters and loss in float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the result here as JSON")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size must be divisible by 16 (four 2x poolings), got {args.size}")
    result = measure(args.size, args.batch, args.dtype, args.repeats, args.warmup, args.compile, args.device)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
