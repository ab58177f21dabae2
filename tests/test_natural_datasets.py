"""Pascal VOC, Cityscapes and SUN RGB-D (data/voc.py, cityscapes.py, sun.py, natural.py,
tfds_natural.py): tiny synthetic folders in each layout (40 x 48 images), the readers' arrays, the
label mappings, the seeded class cover, the weak view, the TFDS round trip without TensorFlow, every
bad input named, and configs/pascal.py, cityscapes.py, sun.py valid on the folders."""
import pickle
import re
import textwrap

import numpy as np
import pytest
from PIL import Image

from arco_jax import evaluators
from arco_jax.config import base_config, validate
from arco_jax.data import cityscapes, natural, pipeline, registry, sun, voc
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError
from tests.tensorflow_stand_in import run_without_tensorflow
from tests.tiny import load_config

H, W = 40, 48
VOC_TRAIN = [f"2007_{i:06d}" for i in range(12)]
VOC_VAL = [f"2008_{i:06d}" for i in range(3)]
# Cityscapes' official labelIds -> trainIds for ids 0..33 (cityscapesScripts labels.py), written out.
CITYSCAPES_TRAIN_IDS = [255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9,
                        10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18]


def _rgb(rng) -> np.ndarray:
    """A smooth random colour image (compresses as JPEG without much loss)."""
    coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((W, H), Image.BILINEAR))


def _palette_png(path, label: np.ndarray) -> None:
    """A palette PNG whose colours are not its indices (index i is colour (i * 37 % 256, ...))."""
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette([(i * k) % 256 for i in range(256) for k in (37, 91, 53)])
    image.save(path)


def voc_label(index: int) -> np.ndarray:
    """Background, classes 1 + (2i mod 20) and 1 + (2i + 1 mod 20), and an ignored border: images i
    and i + 10 hold the same classes, so ten images hold all 21 classes."""
    label = np.zeros((H, W), np.uint8)
    label[5:20, 4:22] = 1 + (2 * index) % 20
    label[22:36, 26:44] = 1 + (2 * index + 1) % 20
    label[0, :] = label[:, -1] = 255
    return label


def write_voc(root):
    """A Pascal folder: {id: (image as written, label)}."""
    rng = np.random.default_rng(0)
    (root / voc.IMAGE_DIR).mkdir(parents=True)
    (root / voc.LABEL_DIR).mkdir()
    written = {}
    for index, name in enumerate(VOC_TRAIN + VOC_VAL):
        image, label = _rgb(rng), voc_label(index)
        Image.fromarray(image).save(root / voc.IMAGE_DIR / f"{name}.jpg", quality=95)
        _palette_png(root / voc.LABEL_DIR / f"{name}.png", label)
        written[name] = (image, label)
    (root / "train_aug.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (root / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return written


CITY_TRAIN = ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bremen/bremen_000000_000019"]
CITY_VAL = ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]


def city_label(index: int) -> np.ndarray:
    label = np.full((H, W), 7, np.uint8)  # road
    label[:10] = 23  # sky
    label[12:30, 5:20] = 24  # person
    if index == 0:
        label[30:38, 0:20] = 26  # car: the first image holds every class of the others
    label[30:, 30:] = 4  # static: ignored
    label[-1] = 0  # unlabeled: ignored
    return label


def write_cityscapes(root):
    rng = np.random.default_rng(1)
    written = {}
    for split, names in (("train", CITY_TRAIN), ("val", CITY_VAL)):
        for index, name in enumerate(names):
            city, stem = name.split("/")
            for folder in (root / cityscapes.IMAGE_DIR / split / city, root / cityscapes.LABEL_DIR / split / city):
                folder.mkdir(parents=True, exist_ok=True)
            image, label = _rgb(rng), city_label(index)
            Image.fromarray(image).save(root / cityscapes.IMAGE_DIR / split / city / f"{stem}{cityscapes.IMAGE_SUFFIX}")
            Image.fromarray(label, mode="L").save(root / cityscapes.LABEL_DIR / split / city /
                                                  f"{stem}{cityscapes.LABEL_SUFFIX}")
            # What the other label files of the download look like: never read.
            Image.fromarray(label).save(root / cityscapes.LABEL_DIR / split / city / f"{stem}_gtFine_instanceIds.png")
            written[name] = (image, label)
    return written


SUN_TRAIN = [f"img-{5051 + i:06d}" for i in range(4)]
SUN_VAL = [f"img-{i:06d}" for i in (3, 7)]


def write_sun(root):
    rng = np.random.default_rng(2)
    for folder in (*sun.IMAGE_DIRS.values(), sun.LABEL_DIR):
        (root / folder).mkdir(parents=True)
    written = {}
    for split, names in (("train", SUN_TRAIN), ("val", SUN_VAL)):
        for index, name in enumerate(names):
            image = _rgb(rng)
            label = rng.integers(1, 38, (H, W)).astype(np.uint8)
            label[:4] = 0  # unlabeled
            Image.fromarray(image).save(root / sun.IMAGE_DIRS[split] / f"{name}.jpg", quality=95)
            Image.fromarray(label, mode="L").save(root / sun.LABEL_DIR / f"{name}.png")
            written[name] = (image, label)
    return written


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("natural")
    roots = {name: base / name for name in ("pascal", "cityscapes", "sun")}
    written = {"pascal": write_voc(roots["pascal"]), "cityscapes": write_cityscapes(roots["cityscapes"]),
               "sun": write_sun(roots["sun"])}
    return roots, written


def dataset_config(name, root, **fields):
    config = base_config()
    registry.select(config, name)
    defaults = {"pascal": {"labeled_images": 10}, "cityscapes": {"labeled_images": 2, "resize": ()},
                "sun": {"labeled_images": 2, "resize": ()}}[name]
    config.data.update({"data_dir": str(root), **defaults, **fields})
    return config


# ----------------------------------------------------------------------------- readers


def test_metadata_is_rgb_255_ignored_and_per_image():
    for name, classes, first in (("pascal", 21, "aeroplane"), ("cityscapes", 19, "sidewalk"), ("sun", 37, "floor")):
        config = base_config()
        registry.select(config, name)
        info = registry.info(config)
        assert (info.num_classes, info.in_channels, info.ignore_label, info.eval_unit, info.spatial_rank,
                info.intensity) == (classes, 3, 255, "image", 2, "imagenet")
        assert info.class_names[0] == first and len(info.class_names) == classes - 1
        assert (config.data.num_classes, config.data.in_channels) == (classes, 3)
        assert evaluators.type_of(config) == "miou"
        assert info.weak_augment == ("crop_flip" if name == "cityscapes" else "scale_crop_flip")


def test_pascal_reads_images_and_palette_indices(folders):
    roots, written = folders
    written = written["pascal"]
    data = registry.open_dataset(dataset_config("pascal", roots["pascal"]))
    assert data.description == f"{roots['pascal']} (Pascal VOC 2012 + SBD, folder: 12 train images, 3 val images)"
    assert data.cases("val") == data.cases("test") == VOC_VAL
    for index, name in enumerate(VOC_VAL):
        case = data.case("val", index)
        image, label = written[name]
        assert case.case == name and case.spacing is None
        np.testing.assert_array_equal(case.label, label)  # the palette's indices, not its colours
        assert case.image.dtype == np.float32 and case.image.shape == (H, W, 3)
        raw = (case.image * natural.IMAGENET_STD + natural.IMAGENET_MEAN) * 255  # undo the normalisation
        assert np.abs(raw - image).mean() < 3  # JPEG
    labeled, unlabeled = data.train_sources()
    item = labeled[0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (H, W, 3) and item["label"].dtype == np.int32
    np.testing.assert_array_equal(item["label"], written[item["name"]][1])
    assert sorted(labeled.names + unlabeled.names) == sorted(VOC_TRAIN)
    assert unlabeled.names == [n for n in VOC_TRAIN if n not in labeled.names]  # list order


def test_cityscapes_maps_label_ids_to_the_19_train_ids(folders):
    roots, written = folders
    written = written["cityscapes"]
    np.testing.assert_array_equal(cityscapes.CODEC.table[:34], CITYSCAPES_TRAIN_IDS)
    assert (cityscapes.CODEC.table[34:255] == -1).all() and cityscapes.CODEC.table[255] == 255
    data = registry.open_dataset(dataset_config("cityscapes", roots["cityscapes"]))
    assert data.cases("val") == CITY_VAL
    expected = np.asarray(CITYSCAPES_TRAIN_IDS, np.uint8)[written[CITY_VAL[1]][1]]
    case = data.case("val", 1)
    np.testing.assert_array_equal(case.label, expected)
    assert set(np.unique(case.label)) == {0, 10, 11, 255}  # road, sky, person; static and unlabeled ignored
    resized = registry.open_dataset(dataset_config("cityscapes", roots["cityscapes"], resize=(20, 24)))
    case = resized.case("val", 1)
    assert case.image.shape == (20, 24, 3) and case.label.shape == (20, 24)
    nearest = np.asarray(Image.fromarray(expected).resize((24, 20), Image.NEAREST))
    np.testing.assert_array_equal(case.label, nearest)
    assert cityscapes.CITYSCAPES.fields()["resize"] == (512, 1024)  # ReCo's 1024 x 512


def test_sun_ignores_unlabeled_and_shifts_the_37_classes(folders):
    roots, written = folders
    written = written["sun"]
    data = registry.open_dataset(dataset_config("sun", roots["sun"]))
    assert data.cases("val") == SUN_VAL and data.store.names["train"] == SUN_TRAIN
    raw = written[SUN_VAL[0]][1]
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(data.case("val", 0).label, expected)
    assert data.case("val", 0).label.max() == 255 and data.case("val", 0).label[4:].max() == 36


# ----------------------------------------------------------------------------- the labeled subset


def test_seeded_class_cover_holds_every_class_and_is_recorded(folders):
    roots, written = folders
    written = written["pascal"]
    data = registry.open_dataset(dataset_config("pascal", roots["pascal"], labeled_images=11, labeled_seed=3))
    record = data.labeled_record
    ids = record["labeled_image_ids"]
    assert record["labeled_images"] == data.labeled_count == 11 == len(set(ids))
    assert record["labeled_rule"] == "seeded class cover, labeled_seed 3"
    assert "classes_in_no_training_image" not in record
    held = set().union(*(np.unique(written[n][1]).tolist() for n in ids[:10]))
    assert held == set(range(21)) | {255}  # the cover (first ten) holds all 21 classes
    # Exactly one of each pair (i, i + 10) is in the cover: the rule takes an image only for a new class.
    assert sorted(VOC_TRAIN.index(n) % 10 for n in ids[:10]) == list(range(10))
    assert data.labeled_description == ("11 labeled images (seeded class cover, labeled_seed 3: the first 10 hold "
                                        "every class)")
    again = registry.open_dataset(dataset_config("pascal", roots["pascal"], labeled_images=11, labeled_seed=3))
    assert again.labeled_record == record  # seeded: the same images
    other = registry.open_dataset(dataset_config("pascal", roots["pascal"], labeled_images=11, labeled_seed=4))
    assert other.labeled_record["labeled_image_ids"] != ids
    with pytest.raises(ConfigError, match=re.escape(
            "config.data.labeled_images: 9 images cannot hold every class: the seeded class cover (labeled_seed 0) "
            f"of list file {roots['pascal'] / 'train_aug.txt'} needs 10")):
        registry.open_dataset(dataset_config("pascal", roots["pascal"], labeled_images=9)).labeled_count


def test_cover_records_classes_no_training_image_holds(folders):
    roots, _ = folders
    data = registry.open_dataset(dataset_config("cityscapes", roots["cityscapes"], labeled_images=2))
    # The training images hold road, sky, person and car: 4 of the 19 classes.
    missing = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15, 16, 17, 18]
    assert data.labeled_record["classes_in_no_training_image"] == missing
    assert f"classes {missing} are in no training image" in data.labeled_description


def test_split_file_gives_the_labeled_images(folders, tmp_path):
    roots, _ = folders
    split = tmp_path / "labeled.txt"
    split.write_text(f"{VOC_TRAIN[4]}\n{VOC_TRAIN[1]}\n\n")
    config = dataset_config("pascal", roots["pascal"], labeled_images=0, labeled_split=str(split))
    validate(config)
    data = registry.open_dataset(config)
    assert data.labeled_record == {"labeled_images": 2, "labeled_rule": f"split file {split}",
                                   "labeled_image_ids": [VOC_TRAIN[4], VOC_TRAIN[1]]}
    assert data.train_sources()[0].names == [VOC_TRAIN[4], VOC_TRAIN[1]]
    assert len(data.train_sources()[1]) == 10
    message = re.escape(f"config.data.labeled_images: 5, but the split file {split} lists 2 images (set it to 2, or 0: "
                        "the file's count)")
    with pytest.raises(ConfigError, match=message):
        registry.validate(dataset_config("pascal", roots["pascal"], labeled_images=5, labeled_split=str(split)))
    split.write_text(f"{VOC_TRAIN[4]}\n2007_999999\n")
    with pytest.raises(DataError, match=re.escape(
            f"split file {split} line 2: image '2007_999999' is not a training image of list file "
            f"{roots['pascal'] / 'train_aug.txt'}")):
        registry.open_dataset(config).labeled_count


# ----------------------------------------------------------------------------- the weak view


def test_weak_view_scales_pads_with_the_ignore_label_crops_flips_and_normalises():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    label = rng.integers(0, 21, (H, W)).astype(np.int32)
    crop = pipeline.WEAK_AUGMENTATIONS["crop_flip"]
    seen_flip = set()
    for seed in range(8):  # scale 1: a crop of the image, maybe mirrored, normalised
        out_image, out_label = crop(image, label, (32, 40), np.random.default_rng(seed), 255)
        assert out_image.dtype == np.float32 and out_image.shape == (32, 40, 3) and out_label.shape == (32, 40)
        matches = [(top, left, flip) for top in range(H - 31) for left in range(W - 39) for flip in (False, True)
                   if np.array_equal(out_label, (label[:, ::-1] if flip else label)[top:top + 32, left:left + 40])]
        top, left, flip = matches[0]
        seen_flip.add(flip)
        source = image[:, ::-1] if flip else image
        np.testing.assert_allclose(out_image, natural.normalize_rgb(source[top:top + 32, left:left + 40]), rtol=1e-6)
    assert seen_flip == {False, True}
    # A crop larger than the image: the label is padded with the ignore label at the bottom and right.
    for seed in range(4):
        out_image, out_label = crop(image, label, (64, 64), np.random.default_rng(seed), 255)
        flipped = out_label[:H, 0] == 255  # a flip moves the padded columns to the left
        columns = slice(0, 64 - W) if flipped.all() else slice(W, 64)
        assert (out_label[H:] == 255).all() and (out_label[:, columns] == 255).all()
        assert (out_label == 255).sum() == 64 * 64 - H * W  # the image's own labels hold no 255
    raw = out_image * natural.IMAGENET_STD + natural.IMAGENET_MEAN
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5  # reflected image pixels, not zeros of another scale
    scaled = pipeline.WEAK_AUGMENTATIONS["scale_crop_flip"]
    sizes = set()
    for seed in range(6):
        out_image, out_label = scaled(image, label, (24, 24), np.random.default_rng(seed), 255)
        assert out_image.shape == (24, 24, 3) and set(np.unique(out_label)) <= set(range(21)) | {255}
        sizes.add(int((out_label == 255).sum()))
    assert len(sizes) > 1  # some scales pad, others do not
    with pytest.raises(ValueError, match="scale_crop_flip takes RGB uint8 images"):
        scaled(image.astype(np.float32), label, (24, 24), np.random.default_rng(0), 255)


def test_training_streams_batch_natural_images(folders):
    roots, _ = folders
    config = dataset_config("pascal", roots["pascal"])
    data = registry.open_dataset(config)
    streams = pipeline.make_source_streams(*data.train_sources(), labeled_batch_size=2, unlabeled_batch_size=3,
                                           patch_size=(32, 32), seed=0, fill_label=255,
                                           augmentation=registry.info(config).weak_augment)
    labeled, unlabeled = next(streams)
    assert labeled["image"].shape == (2, 32, 32, 3) and labeled["image"].dtype == np.float32
    assert labeled["label"].shape == (2, 32, 32) and set(np.unique(labeled["label"])) <= set(range(21)) | {255}
    assert set(unlabeled) == {"image"} and unlabeled["image"].shape == (3, 32, 32, 3)
    streams.close()


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_input_is_named(folders, tmp_path):
    roots, _ = folders
    pascal = _copy(roots["pascal"], tmp_path / "pascal")
    label = pascal / voc.LABEL_DIR / f"{VOC_TRAIN[3]}.png"
    label.unlink()
    with pytest.raises(DataError, match=re.escape(
            f"list file {pascal / 'train_aug.txt'} line 4: image '{VOC_TRAIN[3]}' "
            f"({pascal / voc.IMAGE_DIR / (VOC_TRAIN[3] + '.jpg')}) has no label: {label} is missing")):
        registry.open_dataset(dataset_config("pascal", pascal))
    (pascal / voc.IMAGE_DIR / f"{VOC_TRAIN[3]}.jpg").unlink()
    with pytest.raises(DataError, match=re.escape(f"line 4: image '{VOC_TRAIN[3]}': "
                                                  f"{pascal / voc.IMAGE_DIR / (VOC_TRAIN[3] + '.jpg')} is missing")):
        registry.open_dataset(dataset_config("pascal", pascal))
    (pascal / "train_aug.txt").write_text("\n".join(VOC_TRAIN[:3] + VOC_TRAIN[4:]) + "\n")
    bad = voc_label(0)
    bad[10, 10], bad[11, 11] = 21, 254
    _palette_png(pascal / voc.LABEL_DIR / f"{VOC_VAL[0]}.png", bad)
    data = registry.open_dataset(dataset_config("pascal", pascal))
    with pytest.raises(DataError, match=re.escape(
            f"{pascal / voc.LABEL_DIR / (VOC_VAL[0] + '.png')}: label values 21, 254 are neither classes nor the "
            "ignore label 255 (this dataset's label PNGs hold 0..20 and 255)")):
        data.case("val", 0)
    colour = pascal / voc.LABEL_DIR / f"{VOC_VAL[1]}.png"
    Image.open(colour).convert("RGB").save(colour)  # a palette PNG saved as RGB
    with pytest.raises(DataError, match=re.escape(f"{colour}: a RGB label image holds colours, not class indices")):
        data.case("val", 1)
    Image.fromarray(np.zeros((H, W + 1), np.uint8), mode="L").save(colour)
    with pytest.raises(DataError, match=re.escape(f"{colour}: label size 49 x 40 is not its image's 48 x 40")):
        data.case("val", 1)
    (pascal / "val.txt").unlink()
    with pytest.raises(DataError, match=re.escape(f"list file {pascal / 'val.txt'} is missing")):
        registry.open_dataset(dataset_config("pascal", pascal))

    city = _copy(roots["cityscapes"], tmp_path / "cityscapes")
    name = CITY_TRAIN[2].split("/")
    missing = city / cityscapes.LABEL_DIR / "train" / name[0] / f"{name[1]}{cityscapes.LABEL_SUFFIX}"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(f"{city / cityscapes.IMAGE_DIR / 'train'}: image '{CITY_TRAIN[2]}' (")
                       + ".*" + re.escape(f") has no label: {missing} is missing")):
        registry.open_dataset(dataset_config("cityscapes", city))
    Image.fromarray(np.full((H, W), 34, np.uint8), mode="L").save(missing)
    data = registry.open_dataset(dataset_config("cityscapes", city))
    with pytest.raises(DataError, match=re.escape(f"{missing}: label values 34 are neither classes nor the ignore "
                                                  "label 255 (this dataset's label PNGs hold label ids 0..33 (and "
                                                  "255))")):
        data.store.read("train", 2)

    sun_root = _copy(roots["sun"], tmp_path / "sun")
    Image.fromarray(np.full((H, W), 38, np.uint8), mode="L").save(sun_root / sun.LABEL_DIR / f"{SUN_VAL[1]}.png")
    with pytest.raises(DataError, match=re.escape("label values 38 are neither classes nor the ignore label 255 (this "
                                                  "dataset's label PNGs hold 0 (unlabeled) and the classes 1..37)")):
        registry.open_dataset(dataset_config("sun", sun_root)).case("test", 1)
    (sun_root / sun.LABEL_DIR / f"{SUN_TRAIN[0]}.png").unlink()
    with pytest.raises(DataError, match=re.escape(f"image '{SUN_TRAIN[0]}' (")):
        registry.open_dataset(dataset_config("sun", sun_root))


def test_bad_fields_are_named(folders, tmp_path):
    roots, _ = folders
    cases = [
        ({"source": "zarr"}, r"config\.data\.source: 'zarr' is not one of 'folder', 'tfds'$"),
        ({"data_dir": ""}, r"config\.data\.data_dir: is required for dataset 'pascal' with source 'folder' "
                           r"\(the folder with JPEGImages/"),
        ({"data_dir": str(tmp_path / "none")}, r"config\.data\.data_dir: '.*none' is missing or not a directory$"),
        ({"labeled_images": 12}, r"config\.data\.labeled_images: 12 is not in 1\.\.11: list file .*train_aug\.txt has "
                                 r"12 images and at least one must stay unlabeled$"),
        ({"labeled_images": 0}, r"config\.data\.labeled_images: 0 means 'as many as config\.data\.labeled_split "
                                r"lists'"),
        ({"resize": (10,)}, r"config\.data\.resize: must be \(\) \(images as stored\) or \(height, width\)"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            registry.validate(dataset_config("pascal", roots["pascal"], **fields))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / cityscapes.IMAGE_DIR / 'train'} is missing (a "
                                                  "Cityscapes folder holds")):
        registry.validate(dataset_config("cityscapes", tmp_path))


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def built(folders, tmp_path_factory):
    from arco_jax.data import tfds_natural

    roots, _ = folders
    data_dir = tmp_path_factory.mktemp("tfds")
    assert tfds_natural.build("pascal", roots["pascal"], data_dir) == data_dir / "pascal" / "images" / "1.0.0"
    tfds_natural.build("cityscapes", roots["cityscapes"], data_dir, resize=(20, 24))
    return data_dir


def test_tfds_records_are_the_folder_reads(folders, built):
    roots, _ = folders
    for name, fields in (("pascal", {"labeled_images": 10}), ("cityscapes", {"resize": (20, 24)})):
        folder = registry.open_dataset(dataset_config(name, roots[name], **fields))
        config = dataset_config(name, built, source="tfds", **fields)
        registry.validate(config)
        ours = registry.open_dataset(config)
        assert ours.description.startswith(f"{built} (") and f"TFDS {name}/images" in ours.description
        assert ours.store.names == folder.store.names
        assert ours.labeled_record["labeled_image_ids"] == folder.labeled_record["labeled_image_ids"]
        for split in ("train", "val"):
            for index in range(len(folder.store.names[split])):
                for a, b in zip(ours.store.read(split, index), folder.store.read(split, index)):
                    assert a.dtype == b.dtype == np.uint8
                    np.testing.assert_array_equal(a, b)
        for theirs, mine in zip(folder.train_sources(), ours.train_sources()):
            copy = pickle.loads(pickle.dumps(mine))  # Grain workers get a copy
            assert copy.names == theirs.names
            np.testing.assert_array_equal(copy[len(copy) - 1]["label"], theirs[len(theirs) - 1]["label"])
        np.testing.assert_array_equal(ours.case("test", 1).image, folder.case("test", 1).image)


def test_tfds_bad_input_is_named(folders, built, tmp_path):
    from arco_jax.data import tfds_natural

    roots, _ = folders
    with pytest.raises(ConfigError, match=re.escape(
            f"config.data.resize: (512, 1024), but {built / 'cityscapes' / 'images' / '1.0.0'} was built with "
            "(20, 24)")):
        registry.validate(dataset_config("cityscapes", built, source="tfds", resize=(512, 1024)))
    with pytest.raises(DataError, match=re.escape(
            f"{built} holds no prepared TFDS 'sun' dataset (looked in {built / 'sun' / 'images' / '1.0.0'}); build it "
            f"with `python -m arco_jax.data.tfds_natural --dataset sun --manual_dir <its folder> --data_dir {built}`")):
        registry.open_dataset(dataset_config("sun", built, source="tfds"))
    with pytest.raises(DataError, match=re.escape(f"manual_dir {tmp_path / 'none'} does not exist or is empty")):
        tfds_natural.build("sun", tmp_path / "none", tmp_path / "out")
    broken = _copy(roots["sun"], tmp_path / "sun")
    (broken / sun.LABEL_DIR / f"{SUN_VAL[0]}.png").unlink()
    assert tfds_natural.main(["--dataset", "sun", "--manual_dir", str(broken),
                              "--data_dir", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out" / "sun" / "images" / "1.0.0" / "dataset_info.json").exists()


def test_tfds_build_and_read_never_import_tensorflow(folders, tmp_path):
    roots, _ = folders
    script = textwrap.dedent(f"""\
        import json, sys
        import ml_collections
        from arco_jax.data import tfds_natural, registry
        tfds_natural.main(["--dataset", "sun", "--manual_dir", {str(roots['sun'])!r}, "--data_dir",
                           {str(tmp_path / 'tfds')!r}, "--resize"])
        data = {{"dataset": "sun", "data_dir": {str(tmp_path / 'tfds')!r}, "source": "tfds", "labeled_images": 2,
                 "labeled_split": "", "labeled_seed": 0, "resize": (), "random_scale": True, "num_classes": 37}}
        config = ml_collections.ConfigDict({{"data": data}})
        registry.validate(config)
        opened = registry.open_dataset(config)
        labeled, unlabeled = opened.train_sources()
        item = unlabeled[len(unlabeled) - 1]
        print(json.dumps({{"tensorflow_loaded": "tensorflow" in sys.modules, "labeled": labeled.names,
                           "shape": list(item["image"].shape),
                           "val_label_max": int(opened.case("val", 0).label.max())}}))
        """)
    result = run_without_tensorflow(script, tmp_path)
    assert result["tensorflow_loaded"] is False and len(result["labeled"]) == 2
    assert result["shape"] == [H, W, 3] and result["val_label_max"] == 255


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name, dataset, patch, batch, labeled", [
    ("pascal", "pascal", (321, 321), 10, 60), ("cityscapes", "cityscapes", (512, 512), 2, 20),
    ("sun", "sun", (321, 321), 5, 50)])
def test_configs_carry_the_recipe_and_validate(folders, name, dataset, patch, batch, labeled):
    roots, _ = folders
    config = load_config(name)
    d = config.data
    assert (d.dataset, tuple(d.patch_size), d.batch_labeled, d.batch_unlabeled, d.labeled_images) == (
        dataset, patch, batch, batch, labeled)
    assert (config.model.name, config.model.deeplabv3plus.depth, config.model.deeplabv3plus.output_stride,
            config.model.rep_dim) == ("deeplabv3plus", 101, 16, 256)
    o = config.optim
    assert (o.learning_rate, o.momentum, o.nesterov, o.weight_decay, o.poly_power) == (2.5e-3, 0.9, True, 5e-4, 0.9)
    assert (config.train.steps, config.arco.ema_decay, config.arco.sampler, config.arco.num_strata) == (
        40000, 0.99, "sg", 16)
    assert (config.eval.model, config.loss_weights.contrast, config.loss_weights.eqv) == ("teacher", 1.0, 0.0)
    with config.unlocked():
        d.data_dir = str(roots[dataset])
        d.labeled_images = 2
        if dataset != "pascal":
            d.resize = ()
    validate(config)


def test_config_presets_pass_through():
    from configs import pascal

    supervised = pascal.get_config("method=supervised")
    assert supervised.method == "supervised" and supervised.loss_weights.sup == 1.0
    assert supervised.loss_weights.contrast == 0.0 and supervised.model.name == "deeplabv3plus"
    assert pascal.get_config("method=arco_sag").arco.sampler == "sag"


@pytest.mark.slow
def test_configs_pascal_trains_and_evaluates_on_the_folder(folders, tmp_path):
    """configs/pascal.py end to end at a toy size (ResNet-18 at a quarter width, 32 px crops, 2 steps):
    RGB uint8 sources, the weak view, the ARCO step and the mIoU evaluator (about 2 min on 2 cores)."""
    from absl import flags

    from arco_jax import train

    flags.FLAGS.mark_as_parsed()
    roots, _ = folders
    config = load_config("pascal")
    d, a = config.data, config.arco
    d.data_dir, d.labeled_images, d.patch_size, d.num_workers = str(roots["pascal"]), 10, (32, 32), 0
    d.batch_labeled = d.batch_unlabeled = 2
    config.model.deeplabv3plus.depth, config.model.deeplabv3plus.width, config.model.rep_dim = 18, 0.25, 16
    a.num_anchors, a.num_negatives, a.bank_size, a.bank_size_background, a.bank_enqueue = 8, 16, 256, 256, 32
    config.train.steps = config.train.eval_every = config.train.checkpoint_every = 2
    config.eval.pad_multiple = 64
    results = train.train_and_evaluate(config, tmp_path / "run")
    assert results["evaluator"] == "miou" and results["labeled_images"] == 10
    assert len(results["labeled_image_ids"]) == 10 and results["best_val"]["step"] == 2
    per_class = results["test"]["best"]["per_class"]
    assert len(per_class) == 21 and 0.0 <= results["test"]["last"]["mean"]["miou"] <= 1.0
    assert (tmp_path / "run" / "results.json").is_file()
