"""A dataset defined here, outside arco_jax, plugs in through the public registry alone: a tiny
3-class RGB set with an ignore label trains ARCO (every term on) and is evaluated by mIoU
over non-square images, without any arco_jax module knowing it exists."""
from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from arco_jax import train
from arco_jax.config import ConfigError, base_config, validate
from arco_jax.data import registry
from arco_jax.errors import ConfigError as RegistryConfigError
from tests import tiny

IGNORE = 255
TRAIN_SIZE, EVAL_SHAPE = (32, 32), (30, 44)  # eval images are padded to 32 x 48 (multiples of 16)


def toy_image(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Noise with a red and a blue rectangle (classes 1, 2) and an unlabeled (ignored) border."""
    rng = np.random.default_rng(seed)
    height, width = shape
    image = rng.normal(0.0, 0.2, (height, width, 3)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for cls, channel in ((1, 0), (2, 2)):
        y, x = rng.integers(2, height - 12), rng.integers(2, width - 12)
        image[y:y + 10, x:x + 10, channel] += 1.5
        label[y:y + 10, x:x + 10] = cls
    label[:2] = label[-2:] = IGNORE
    label[:, :2] = label[:, -2:] = IGNORE
    return image, label


class ToySource:
    def __init__(self, seeds):
        self.seeds = list(seeds)

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, index):
        image, label = toy_image(self.seeds[index], TRAIN_SIZE)
        return {"image": image, "label": label}


class OpenToy:
    description = "toy RGB squares (in memory)"

    def __init__(self, config):
        self.labeled_count = config.data.labeled_images
        self.labeled_description = f"{self.labeled_count} labeled images"
        self.labeled_record = {"labeled_images": self.labeled_count}
        self.read = []  # (split, index) in the order cases were read

    def train_sources(self):
        return ToySource(range(self.labeled_count)), ToySource(range(100, 112))

    def cases(self, split):
        return [f"{split}_{i}" for i in range(3)]

    def case(self, split, index):
        self.read.append((split, index))
        image, label = toy_image(1000 + 10 * (split == "test") + index, EVAL_SHAPE)
        return registry.Case(f"{split}_{index}", image, label)


def check_toy(config):
    if config.data.labeled_images < 1:
        raise RegistryConfigError(f"config.data.labeled_images: must be >= 1, got {config.data.labeled_images}")


OPENED = []
TOY = registry.DatasetSpec(
    name="toy_rgb", fields=lambda: {"labeled_images": 4},
    info=lambda config: registry.DatasetInfo(num_classes=3, class_names=("red", "blue"), ignore_label=IGNORE,
                                             spatial_rank=2, in_channels=3, eval_unit="image"),
    validate=check_toy, open=lambda config: OPENED.append(OpenToy(config)) or OPENED[-1])


@pytest.fixture(scope="module")
def toy_registered():
    registry.register(TOY)
    yield
    registry.unregister(TOY.name)


def toy_config(steps: int = 4) -> ml_collections.ConfigDict:
    c = base_config()
    registry.select(c, "toy_rgb")
    c.data.patch_size = TRAIN_SIZE
    c.data.batch_labeled = c.data.batch_unlabeled = 2
    c.data.num_workers = 0
    tiny.narrow_model(c)
    tiny.tiny_arco(c)
    t = c.train
    t.steps = steps
    t.log_every = t.eval_every = t.checkpoint_every = 2
    return c


def test_selecting_the_dataset_records_its_metadata_and_fields(toy_registered):
    c = toy_config()
    assert (c.data.num_classes, tuple(c.data.class_names), c.data.ignore_label, c.data.in_channels) == (
        3, ("red", "blue"), IGNORE, 3)
    assert c.data.labeled_images == 4 and "toy_rgb" in registry.names()
    validate(c)
    c.data.labeled_images = 0
    with pytest.raises(ConfigError, match="config.data.labeled_images: must be >= 1"):
        validate(c)
    c = toy_config()
    c.data.ignore_label = 0
    with pytest.raises(ConfigError, match="config.data.ignore_label: 0, but dataset 'toy_rgb' declares 255"):
        validate(c)


def test_unknown_dataset_is_named_with_the_known_ones():
    c = base_config()
    c.data.dataset = "pascal_voc_2031"
    with pytest.raises(ConfigError, match="'pascal_voc_2031' is not a registered dataset; known: ") as err:
        validate(c)
    # The built-in datasets, sorted; other test modules' registrations (made at import) may be among them.
    known = str(err.value).split("known: ", 1)[1].split(", ")
    assert known == sorted(known) and {"acdc", "la", "la_phantom", "phantom"} <= set(known)


def test_a_dataset_defined_in_a_test_trains_and_is_evaluated_by_miou(toy_registered, tmp_path):
    results = train.train_and_evaluate(toy_config(), tmp_path / "run")
    assert results["dataset"] == "toy_rgb" and results["labeled_images"] == 4
    assert results["evaluator"] == "miou" and results["ignore_label"] == IGNORE
    assert set(results["test"]) == {"best", "last"}
    for record in results["test"].values():
        confusion = np.asarray(record["confusion"])
        # Every labeled pixel of the 3 test images is counted once, the ignored border never.
        labeled = sum(int(np.sum(toy_image(1010 + i, EVAL_SHAPE)[1] != IGNORE)) for i in range(3))
        assert confusion.shape == (3, 3) and confusion.sum() == labeled
        assert 0.0 <= record["mean"]["miou"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in lines if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and all("miou" in r for r in val)
    train_lines = [r for r in lines if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) and r["loss_contrast"] > 0 for r in train_lines)
    assert results["best_val"]["val_miou"] == max(r["miou"] for r in val)
    # Cases are streamed: each evaluation reads its split's cases one by one, in order.
    assert OPENED[-1].read[:3] == [("val", 0), ("val", 1), ("val", 2)]
    assert (tmp_path / "run" / "results.md").read_text().count("| Mean |") == 2
