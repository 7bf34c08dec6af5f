"""DIS5K-layout datasets: image/mask pairs, edge maps, the paper's augmentation and CutMix.

Layout: ``ROOT/<split>/im/*.jpg`` + ``ROOT/<split>/gt/*.png`` (DIS5K: DIS-TR, DIS-VD, DIS-TE1..4), or any
folder holding ``im/`` + ``gt/``. Images are matched to masks by file stem.

Everything random in a training sample is drawn from a generator seeded by (seed, epoch, index), so a
sample is the same whichever worker or process loads it, and a resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler, default_collate

from diffdis_core import DiffDISError
from diffdis_core.image_io import IMAGE_EXTENSIONS, save_image

DIS5K_SPLITS = ["DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"]
LAYOUT_HINT = "expected DIS5K layout (<dataset>/<split>/im/*.jpg + gt/*.png) or a folder with im/ and gt/"

# The spec's edge definition: 5x5 dilation minus 5x5 erosion of the 8-bit mask, then >= 6 -> 255.
EDGE_KERNEL = 5
EDGE_THRESHOLD = 6


@dataclass(frozen=True)
class Sample:
    name: str  # the shared file stem
    image: Path
    mask: Path


# ---------------------------------------------------------------------------------------------- finding data
def split_folder(dataset: str | os.PathLike, split: str) -> Path:
    """The folder holding im/ and gt/: ``dataset`` itself if it has them, else ``dataset/split``."""
    root = Path(dataset)
    if not root.is_dir():
        raise DiffDISError(f"dataset folder {root} does not exist; {LAYOUT_HINT}")
    if (root / "im").is_dir() and (root / "gt").is_dir():
        return root
    folder = root / split
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DiffDISError(f"{root} has no split {split}/ (it has: {', '.join(present) or 'no folders'}); "
                           f"{LAYOUT_HINT}")
    for part in ("im", "gt"):
        if not (folder / part).is_dir():
            raise DiffDISError(f"{folder} has no {part}/ folder; {LAYOUT_HINT}")
    return folder


def _by_stem(folder: Path, extensions: set[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith("."):
            if path.stem in found:
                raise DiffDISError(f"{found[path.stem].name} and {path.name} in {folder} have the same stem; "
                                   "keep one of them")
            found[path.stem] = path
    return found


def find_pairs(folder: str | os.PathLike, check_sizes: bool = False) -> list[Sample]:
    """Images in ``folder/im`` matched to masks in ``folder/gt`` by stem, sorted by name.

    A stem present on one side only is an error naming the files (a silent skip would change the data).
    ``check_sizes``: also require each image and its mask to have the same size (reads headers only).
    """
    folder = Path(folder)
    images = _by_stem(folder / "im", IMAGE_EXTENSIONS)
    masks = _by_stem(folder / "gt", IMAGE_EXTENSIONS)
    if not images:
        raise DiffDISError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder / 'im'}")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        parts = []
        if no_mask:
            examples = ", ".join(images[s].name for s in no_mask[:3])
            parts.append(f"{len(no_mask)} image(s) without a mask in gt/, e.g. {examples}")
        if no_image:
            examples = ", ".join(masks[s].name for s in no_image[:3])
            parts.append(f"{len(no_image)} mask(s) without an image in im/, e.g. {examples}")
        raise DiffDISError(f"{folder}: {'; '.join(parts)}; images and masks are matched by file name stem")
    samples = [Sample(stem, images[stem], masks[stem]) for stem in sorted(images)]
    if check_sizes:
        for sample in samples:
            image_size, mask_size = image_size_of(sample.image), image_size_of(sample.mask)
            if image_size != mask_size:
                raise DiffDISError(f"{sample.image} is {image_size[0]}x{image_size[1]} but its mask {sample.mask} is "
                                   f"{mask_size[0]}x{mask_size[1]}; fix or remove the pair")
    return samples


def image_size_of(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DiffDISError(f"{path}: unreadable image ({error})") from None


def check_decodes(path: str | os.PathLike, what: str = "image") -> None:
    """Decode the whole file (a truncated or damaged one fails here, not when first sampled); JPEGs at
    1/8 scale, which still reads every byte of their compressed data."""
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DiffDISError(f"{path}: unreadable {what} ({error}); fix or remove the pair") from None


class _DecodeChecks(Dataset):
    """Checks one sample's image and mask; a Dataset so DataLoader workers can share the work."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> str:
        sample = self.samples[index]
        try:
            check_decodes(sample.image)
            check_decodes(sample.mask, "mask")
        except DiffDISError as problem:
            return str(problem)  # returned, not raised: the first problem is reported in one line
        return ""


def damaged_samples(samples: list[Sample], num_workers: int = 0, progress: bool = True) -> list[str]:
    """What is wrong with each image or mask that does not decode, in sample order (empty: all whole);
    ``progress``: a bar on a terminal."""
    from tqdm.auto import tqdm

    # Its own generator: the global RNG stays as the seed left it (see prepare_edge_maps).
    loader = torch.utils.data.DataLoader(_DecodeChecks(samples), batch_size=None, num_workers=num_workers,
                                         generator=torch.Generator())
    # The bar only on a terminal (disable=None): the check comes before errors that must stay one line.
    return [problem for problem in tqdm(loader, total=len(samples), desc="checking images", unit="pair",
                                        disable=None if progress else True, leave=False) if problem]


def _open_as(path: str | os.PathLike, mode: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DiffDISError(f"{path}: unreadable {what} ({error})") from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image's stored pixels as RGB. No EXIF rotation: DIS5K masks are aligned with the stored pixels."""
    return _open_as(path, "RGB", "image")


def load_mask(path: str | os.PathLike) -> Image.Image:
    """A mask as 8-bit grayscale (as the authors: PIL ``convert('L')``)."""
    return _open_as(path, "L", "mask")


# ---------------------------------------------------------------------------------------------- edge maps
def edge_map(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """The spec's edge map of an 8-bit mask [H, W]: (5x5 dilation - 5x5 erosion) >= 6 -> 255, else 0.

    Max-pooling pads with -inf, so, as OpenCV's default border, pixels outside the image never count.
    """
    x = torch.tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    pad = EDGE_KERNEL // 2
    dilated = F.max_pool2d(x, EDGE_KERNEL, stride=1, padding=pad)
    eroded = -F.max_pool2d(-x, EDGE_KERNEL, stride=1, padding=pad)
    return ((dilated - eroded)[0, 0] >= EDGE_THRESHOLD).to(torch.uint8).mul_(255).numpy()


def edge_cache_folder(cache_root: str | os.PathLike, split: Path) -> Path:
    """A cache subfolder per mask folder (its name plus a hash of its absolute path)."""
    gt = (split / "gt").resolve()
    digest = hashlib.sha1(str(gt).encode()).hexdigest()[:10]
    return Path(cache_root) / f"{split.name}-{digest}"


def edge_path(folder: Path, sample: Sample) -> Path:
    return folder / f"{sample.name}.png"


def _edge_is_current(edge: Path, mask: Path) -> bool:
    return edge.is_file() and edge.stat().st_mtime >= mask.stat().st_mtime


class _EdgeJobs(Dataset):
    """Computes and writes missing edge maps; a Dataset so DataLoader workers can share the work."""

    def __init__(self, samples: list[Sample], folder: Path):
        self.samples, self.folder = samples, folder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> int:
        sample = self.samples[index]
        target = edge_path(self.folder, sample)
        edge = edge_map(np.asarray(load_mask(sample.mask)))
        save_image(Image.fromarray(edge, "L"), target)  # atomic: a killed run never leaves a truncated edge map
        return index


def prepare_edge_maps(samples: list[Sample], folder: Path, num_workers: int = 0, progress: bool = True) -> int:
    """Write the edge maps that are missing or older than their mask into ``folder``; return how many."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    todo = [s for s in samples if not _edge_is_current(edge_path(folder, s), s.mask)]
    if not todo:
        return 0
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, and
    # whether this runs at all depends on the cache.
    loader = torch.utils.data.DataLoader(_EdgeJobs(todo, folder), batch_size=None, num_workers=num_workers,
                                         generator=torch.Generator())
    for _ in tqdm(loader, total=len(todo), desc=f"edge maps ({folder.name})", unit="mask", disable=not progress):
        pass
    return len(todo)


# ---------------------------------------------------------------------------------------------- augmentation
@dataclass
class Augmentation:
    """The paper's augmentation (authors' dataset code); each part can be switched off for ablations."""

    flip: bool = True  # horizontal, p = 0.5
    crop: bool = True  # centred window 0-29 px narrower and shorter
    crop_border: int = 30
    rotation: bool = True  # bicubic, +-15 degrees
    rotation_prob: float = 0.2
    max_angle: int = 15
    color: bool = True  # brightness, contrast x0.5-1.5; colour x0-2; sharpness x0-3 (0.1 steps)
    cutmix: bool = True  # within each pair of the batch, on image, mask and edge alike
    cutmix_prob: float = 0.5
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    cutmix_aspect: tuple[float, float] = (0.3, 1 / 0.3)

    def apply(self, image: Image.Image, mask: Image.Image, edge: Image.Image, rng: np.random.Generator
              ) -> tuple[Image.Image, Image.Image, Image.Image]:
        if self.flip and rng.integers(0, 2) == 1:
            image, mask, edge = (x.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for x in (image, mask, edge))
        if self.crop:
            width, height = image.size
            crop_w = int(rng.integers(max(1, width - self.crop_border), width)) if width > 1 else width
            crop_h = int(rng.integers(max(1, height - self.crop_border), height)) if height > 1 else height
            box = ((width - crop_w) >> 1, (height - crop_h) >> 1, (width + crop_w) >> 1, (height + crop_h) >> 1)
            image, mask, edge = (x.crop(box) for x in (image, mask, edge))
        if self.rotation and rng.random() < self.rotation_prob:
            angle = int(rng.integers(-self.max_angle, self.max_angle + 1))
            image, mask, edge = (x.rotate(angle, Image.Resampling.BICUBIC) for x in (image, mask, edge))
        if self.color:
            image = ImageEnhance.Brightness(image).enhance(rng.integers(5, 16) / 10)
            image = ImageEnhance.Contrast(image).enhance(rng.integers(5, 16) / 10)
            image = ImageEnhance.Color(image).enhance(rng.integers(0, 21) / 10)
            image = ImageEnhance.Sharpness(image).enhance(rng.integers(0, 31) / 10)
        return image, mask, edge

    def cutmix_box(self, size: int, rng: np.random.Generator) -> torch.Tensor:
        """A [size, size] bool box (all False with probability 1 - cutmix_prob): area 2-40 %, aspect 0.3-3.3."""
        box = torch.zeros(size, size, dtype=torch.bool)
        if not self.cutmix or rng.random() >= self.cutmix_prob:
            return box
        area = rng.uniform(*self.cutmix_area) * size * size
        while True:  # the authors' rejection sampling: redraw until the box fits
            aspect = rng.uniform(*self.cutmix_aspect)
            box_w, box_h = int(np.sqrt(area / aspect)), int(np.sqrt(area * aspect))
            x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
            if x + box_w <= size and y + box_h <= size:
                break
        box[y:y + box_h, x:x + box_w] = True
        return box


def to_signed_unit(array: np.ndarray) -> torch.Tensor:
    """Min-max scale to [-1, 1] (the authors' normalisation); a constant map keeps its 8-bit level."""
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else array / 255.0
    return torch.from_numpy(scaled * 2 - 1)


class DISTrainDataset(Dataset):
    """Augmented training samples at ``resolution``²: image [3, R, R], mask and edge [1, R, R] in [-1, 1],
    and the sample's CutMix box [R, R]. Indexed by ``(epoch, index)`` (see ``EpochShuffleSampler``)."""

    def __init__(self, samples: list[Sample], edge_folder: Path, resolution: int, augmentation: Augmentation,
                 seed: int = 0):
        self.samples = samples
        self.edge_folder = edge_folder
        self.resolution = resolution
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        image, mask = load_rgb(sample.image), load_mask(sample.mask)
        edge = load_mask(edge_path(self.edge_folder, sample))
        image, mask, edge = self.augmentation.apply(image, mask, edge, rng)
        size = (self.resolution, self.resolution)
        image, mask, edge = (x.resize(size, Image.Resampling.BILINEAR) for x in (image, mask, edge))
        return {
            "image": to_signed_unit(np.asarray(image)).permute(2, 0, 1).contiguous(),
            "mask": to_signed_unit(np.asarray(mask))[None],
            "edge": to_signed_unit(np.asarray(edge))[None],
            "box": self.augmentation.cutmix_box(self.resolution, rng),
            "name": sample.name,
        }


class EpochShuffleSampler(Sampler):
    """A fresh permutation per epoch from ``seed + epoch``; yields ``(epoch, index)`` keys."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = (torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.size))
        return iter([(self.epoch, int(i)) for i in order])


def cutmix_pairs(image: torch.Tensor, mask: torch.Tensor, edge: torch.Tensor, box: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix within each pair (0, 1), (2, 3), ... of the batch: inside its own box, each item takes its
    partner's (original) pixels, in image, mask and edge alike. Returns new tensors."""
    out = [image.clone(), mask.clone(), edge.clone()]
    for first in range(0, image.shape[0] - 1, 2):
        for item, partner in ((first, first + 1), (first + 1, first)):
            region = box[item]
            for result, source in zip(out, (image, mask, edge), strict=True):
                result[item][:, region] = source[partner][:, region]
    return out[0], out[1], out[2]


class CutMixCollate:
    """Batches samples and applies CutMix within pairs (a class, so DataLoader workers can pickle it)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        if self.enabled:
            batch["image"], batch["mask"], batch["edge"] = cutmix_pairs(
                batch["image"], batch["mask"], batch["edge"], batch["box"])
        return batch
