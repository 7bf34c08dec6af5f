"""Training data: pairing, edge maps, augmentation, CutMix, noise and the lr schedule."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffdis_core import DiffDISError
from training.data import (
    Augmentation,
    CutMixCollate,
    DISTrainDataset,
    EpochShuffleSampler,
    cutmix_pairs,
    edge_cache_folder,
    edge_map,
    find_pairs,
    prepare_edge_maps,
    split_folder,
)
from training import synthetic
from training import train as train_script
from training.recipe import lr_multiplier, optimizer_param_groups, pyramid_noise_like
from training.synthetic import make_split


def test_edge_map_of_a_square_is_the_band_within_two_pixels_of_its_border():
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    expected = np.zeros((40, 40), np.uint8)
    expected[8:32, 8:32] = 255  # 5x5 dilation reaches 2 px out
    expected[12:28, 12:28] = 0  # 5x5 erosion keeps what is 2 px in
    assert np.array_equal(edge_map(mask), expected)


def test_edge_map_threshold_and_borders():
    faint = np.zeros((20, 20), np.uint8)
    faint[5:15, 5:15] = 5  # dilation - erosion = 5 < 6: no edge
    assert not edge_map(faint).any()
    faint[5:15, 5:15] = 6  # = 6: an edge
    assert edge_map(faint).any()
    # Outside the image never counts: a full mask, or one touching the border, has no edge along the border.
    assert not edge_map(np.full((16, 16), 255, np.uint8)).any()
    half = np.zeros((16, 16), np.uint8)
    half[:, :8] = 255
    edge = edge_map(half)
    assert edge[:, 6:10].all() and not edge[:, :6].any() and not edge[:, 10:].any()


def test_edge_map_matches_opencv_morphology_on_random_masks():
    cv2 = pytest.importorskip("cv2")  # only to check the definition; not a dependency
    rng = np.random.default_rng(0)
    kernel = np.ones((5, 5), np.uint8)
    for _ in range(5):
        mask = (rng.random((37, 53)) > 0.7).astype(np.uint8) * rng.integers(1, 256, (37, 53)).astype(np.uint8)
        reference = cv2.dilate(mask, kernel) - cv2.erode(mask, kernel)
        reference = np.where(reference >= 6, 255, 0).astype(np.uint8)
        assert np.array_equal(edge_map(mask), reference)


def test_pairs_match_by_stem_and_mismatches_are_named(tmp_path):
    make_split(tmp_path / "DIS-TR", 3)
    folder = split_folder(tmp_path, "DIS-TR")
    samples = find_pairs(folder, check_sizes=True)
    assert [s.name for s in samples] == sorted(s.name for s in samples) and len(samples) == 3
    assert all(s.image.stem == s.mask.stem for s in samples)
    assert split_folder(folder, "ignored") == folder  # a plain im/ + gt/ folder works too

    (folder / "gt" / f"{samples[0].name}.png").rename(folder / "gt" / "stray.png")
    with pytest.raises(DiffDISError, match=rf"{samples[0].name}\.jpg.*stray\.png"):
        find_pairs(folder)
    with pytest.raises(DiffDISError, match="no split DIS-VD"):
        split_folder(tmp_path, "DIS-VD")


def test_image_and_mask_of_different_sizes_are_reported(tmp_path):
    make_split(tmp_path, 1)
    mask = next((tmp_path / "gt").iterdir())
    Image.new("L", (7, 9)).save(mask)
    with pytest.raises(DiffDISError, match=f"{mask.name}.*7x9"):
        find_pairs(tmp_path, check_sizes=True)


def test_cutmix_swaps_the_same_box_in_image_mask_and_edge():
    size = 8
    image = torch.stack([torch.full((3, size, size), 1.0), torch.full((3, size, size), 2.0)])
    mask, edge = image[:, :1] * 10, image[:, :1] * 100
    box = torch.zeros(2, size, size, dtype=torch.bool)
    box[0, 1:4, 2:6] = True
    box[1, 5:8, 0:2] = True
    mixed = cutmix_pairs(image, mask, edge, box)
    for tensor, scale, result in zip((image, mask, edge), (1, 10, 100), mixed, strict=True):
        for item, partner in ((0, 1), (1, 0)):
            expected = torch.where(box[item], float(scale * (partner + 1)), float(scale * (item + 1)))
            assert torch.equal(result[item], expected.expand_as(result[item]))
        originals = torch.stack([torch.full_like(tensor[0], scale), torch.full_like(tensor[0], 2 * scale)])
        assert torch.equal(tensor, originals)  # the inputs are left as they were


def test_cutmix_boxes_follow_the_recipe():
    augmentation = Augmentation()
    rng = np.random.default_rng(0)
    boxes = [augmentation.cutmix_box(64, rng) for _ in range(400)]
    areas = np.array([b.sum().item() / 64**2 for b in boxes])
    assert 0.4 < (areas > 0).mean() < 0.6  # p = 0.5
    drawn = areas[areas > 0]
    assert drawn.min() > 0.015 and drawn.max() <= 0.4
    assert not Augmentation(cutmix=False).cutmix_box(64, rng).any()


@pytest.fixture(scope="module")
def toy_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_split(root, 4)
    samples = find_pairs(root)
    cache = edge_cache_folder(tmp_path_factory.mktemp("cache"), root)
    assert prepare_edge_maps(samples, cache, progress=False) == 4
    assert prepare_edge_maps(samples, cache, progress=False) == 0  # cached
    return root, samples, cache


def test_edge_cache_holds_the_spec_edges_outside_the_dataset(toy_samples):
    root, samples, cache = toy_samples
    assert sorted(p.name for p in (root / "gt").iterdir()) == sorted(f"{s.name}.png" for s in samples)
    assert not (root / "edge").exists() and not str(cache).startswith(str(root))
    for sample in samples:
        cached = np.asarray(Image.open(cache / f"{sample.name}.png"))
        assert np.array_equal(cached, edge_map(np.asarray(Image.open(sample.mask).convert("L"))))


def test_training_samples_are_reproducible_per_epoch_and_in_range(toy_samples):
    _, samples, cache = toy_samples
    dataset = DISTrainDataset(samples, cache, 32, Augmentation(rotation_prob=1.0), seed=3)
    first, again, other_epoch = dataset[(0, 1)], dataset[(0, 1)], dataset[(1, 1)]
    for key in ("image", "mask", "edge", "box"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other_epoch["image"])
    assert first["image"].shape == (3, 32, 32) and first["mask"].shape == first["edge"].shape == (1, 32, 32)
    for key in ("image", "mask", "edge"):
        assert first[key].min() == -1 and first[key].max() == 1
    batch = CutMixCollate(True)([dataset[(0, i)] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["name"] == [s.name for s in samples]


def test_sampler_gives_a_new_order_each_epoch_and_the_same_order_again():
    sampler = EpochShuffleSampler(10, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert {i for _, i in first} == set(range(10)) and all(e == 0 for e, _ in first)
    assert [i for _, i in first] != [i for _, i in second] and all(e == 1 for e, _ in second)
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_pyramid_noise_is_unit_std_reproducible_and_low_frequency():
    x = torch.zeros(4, 4, 32, 32)
    noise = pyramid_noise_like(x, 0.8, torch.Generator().manual_seed(0))
    assert torch.equal(noise, pyramid_noise_like(x, 0.8, torch.Generator().manual_seed(0)))
    assert noise.shape == x.shape and abs(noise.std().item() - 1) < 1e-5
    white = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    # Neighbouring values correlate (coarse levels), unlike white noise.
    def neighbour_correlation(n):
        return torch.corrcoef(torch.stack([n[..., :-1].flatten(), n[..., 1:].flatten()]))[0, 1].item()
    assert neighbour_correlation(noise) > 0.1 > abs(neighbour_correlation(white))


def test_lr_schedule_and_bde_learning_rate():
    assert [lr_multiplier(e) for e in (0, 29, 30, 59, 60)] == [1, 1, 0.95, 0.95, 0.95**2]
    # The authors' code compounds: after epoch 31 (1-based) the lr has been multiplied by 0.95 twice.
    assert lr_multiplier(30, compound=True) == pytest.approx(0.95)
    assert lr_multiplier(31, compound=True) == pytest.approx(0.95**2)
    model = torch.nn.Module()
    model.class_embedding = torch.nn.Linear(4, 4)
    model.conv_in = torch.nn.Conv2d(8, 4, 3)
    groups = optimizer_param_groups(model, 3e-5)
    assert groups[0]["lr"] == 3e-5 and groups[1]["lr"] == pytest.approx(3e-4)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.class_embedding.parameters()}


def test_default_lr_schedule_is_the_authors_code():
    # Their run_train.py: after each epoch e = 1, 2, ... `lr *= decay ** (e // decay_epoch)` (utils.adjust_lr).
    args = train_script.build_parser().parse_args(["--dataset", "d", "--output", "o"])
    lr, rates = args.lr, []
    for epoch in range(1, 101):
        rates.append(lr)
        lr *= args.lr_decay ** (epoch // args.lr_decay_epochs)
    compound = args.lr_schedule == "authors"
    ours = [args.lr * lr_multiplier(e, args.lr_decay, args.lr_decay_epochs, compound) for e in range(100)]
    assert ours == pytest.approx(rates, rel=1e-9)
    assert rates[-1] == pytest.approx(3e-5 * 0.95**120)


def test_synthetic_command_makes_a_dataset_and_a_tiny_base(tmp_path, capsys):
    assert synthetic.main([str(tmp_path / "smoke"), "--train", "2", "--val", "1"]) == 0
    out = capsys.readouterr().out
    dataset, base = tmp_path / "smoke" / "DIS5K", tmp_path / "smoke" / "sd-turbo-tiny"
    assert [len(find_pairs(dataset / split)) for split in ("DIS-TR", "DIS-VD")] == [2, 1]
    for part in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "empty_text_embed.safetensors"):
        assert (base / part).is_file(), part
    assert f"train.py --pretrained {base} --base none --dataset {dataset}" in out
    assert synthetic.main([str(tmp_path / "smoke")]) == 2  # never over what is there
    assert "already exists" in capsys.readouterr().err
