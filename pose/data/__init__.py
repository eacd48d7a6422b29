"""Pose datasets: ``coco:ROOT``, ``mpii:ROOT`` and ``synthetic[:N]`` (``synthetic-mpii[:N]``) specs.

A ``-easy`` suffix (``synthetic-easy[:N]``, ``synthetic-mpii-easy[:N]``) selects the generator's easy
difficulty level (one person, little clutter, no occluders; see ``pose.data.synthetic.LEVELS``).

``synthetic`` specs are generated once into a cache folder (``EFFPOSE_CACHE_DIR`` or
``~/.cache/effpose``) and read back through the same COCO / MPII readers as real data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pose.data.coco import coco_dataset
from pose.data.dataset import Augment, PoseDataset, Record, collate, make_loader, read_image
from pose.data.mpii import load_gt_valid, mpii_dataset
from pose.data.synthetic import DEFAULT_LEVEL, DEFAULT_SEED, synthetic_root

__all__ = [
    "Augment",
    "DataSpec",
    "PoseDataset",
    "Record",
    "build_dataset",
    "build_datasets",
    "collate",
    "default_input_hw",
    "load_gt_valid",
    "make_loader",
    "parse_spec",
    "read_image",
]

DEFAULT_SYNTHETIC_IMAGES = 256
SPEC_HELP = (
    "coco:ROOT, mpii:ROOT, synthetic[:N] (COCO keypoints) or synthetic-mpii[:N]; "
    "a -easy suffix (synthetic-mpii-easy[:N]) selects the easy difficulty level"
)
SYNTHETIC_HEADS = {
    f"synthetic{layout}{suffix}": ("mpii" if layout == "-mpii" else "coco", level)
    for layout in ("", "-coco", "-mpii")
    for suffix, level in (("", DEFAULT_LEVEL), ("-easy", "easy"))
}


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "coco" | "mpii" (the layout and metric)
    root: Path | None  # None for synthetic until generated
    synthetic: bool = False
    images: int = 0
    seed: int = DEFAULT_SEED
    level: str = DEFAULT_LEVEL  # synthetic difficulty level

    def resolve(self) -> Path:
        """The dataset root; generates a synthetic dataset into the cache on first use."""
        if self.synthetic:
            return synthetic_root(self.images, self.kind, self.seed, level=self.level)
        assert self.root is not None
        return self.root

    @property
    def splits(self) -> tuple[str, str]:
        return ("train2017", "val2017") if self.kind == "coco" else ("train", "valid")


def parse_spec(spec: str, seed: int = DEFAULT_SEED) -> DataSpec:
    """Parse a data SPEC; errors say what a SPEC looks like."""
    text = str(spec).strip()
    head, _, rest = text.partition(":")
    if head in SYNTHETIC_HEADS:
        try:
            images = int(rest) if rest else DEFAULT_SYNTHETIC_IMAGES
        except ValueError:
            raise ValueError(f"bad data spec {spec!r}: the image count after '{head}:' must be an integer") from None
        if images < 1:
            raise ValueError(f"bad data spec {spec!r}: the image count must be at least 1")
        kind, level = SYNTHETIC_HEADS[head]
        return DataSpec(kind, None, True, images, seed, level)
    if head in ("coco", "mpii"):
        if not rest:
            raise ValueError(f"bad data spec {spec!r}: {head}: needs a dataset root, e.g. {head}:/data/{head}")
        root = Path(rest).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} (from data spec {spec!r}) is not a directory")
        return DataSpec(head, root)
    raise ValueError(f"bad data spec {spec!r}: expected {SPEC_HELP}")


def default_input_hw(spec: str | DataSpec) -> tuple[int, int]:
    """Real data: the paper's sizes (COCO 256x192, MPII 256x256); synthetic: a small CPU-friendly size."""
    data = parse_spec(spec) if isinstance(spec, str) else spec
    if data.synthetic:
        return (128, 96) if data.kind == "coco" else (128, 128)
    return (256, 192) if data.kind == "coco" else (256, 256)


def build_dataset(
    spec: str | DataSpec,
    split: str,
    input_hw: tuple[int, int] | None = None,
    *,
    train: bool = False,
    boxes: str | Path | None = None,
    color_order: str = "RGB",
    on_bad_image: str = "fail",
    seed: int = 0,
) -> PoseDataset:
    """One dataset; ``split`` is "train", "val" or a split name of the layout (e.g. train2017, valid)."""
    data = parse_spec(spec) if isinstance(spec, str) else spec
    input_hw = tuple(input_hw or default_input_hw(data))
    name = {"train": data.splits[0], "val": data.splits[1]}.get(split, split)
    root = data.resolve()
    kwargs = dict(color_order=color_order, on_bad_image=on_bad_image, seed=seed)
    if data.kind == "coco":
        return coco_dataset(root, name, input_hw, train=train, boxes=boxes, **kwargs)
    if boxes is not None:
        raise ValueError("--boxes is for COCO data; MPII evaluation uses the annotated person centers and scales")
    return mpii_dataset(root, name, input_hw, train=train, **kwargs)


def build_datasets(
    spec: str | DataSpec,
    input_hw: tuple[int, int] | None = None,
    *,
    color_order: str = "RGB",
    on_bad_image: str = "fail",
    seed: int = 0,
    augment: bool = True,
    splits: tuple[str | None, str | None] = (None, None),
) -> tuple[PoseDataset, PoseDataset]:
    """(train, val) datasets: training with augmentation, validation without; ``splits`` renames the
    layout's split folders (default train2017/val2017 for COCO, train/valid for MPII)."""
    data = parse_spec(spec) if isinstance(spec, str) else spec
    train = build_dataset(
        data,
        splits[0] or "train",
        input_hw,
        train=augment,
        color_order=color_order,
        on_bad_image=on_bad_image,
        seed=seed,
    )
    val = build_dataset(
        data, splits[1] or "val", input_hw, color_order=color_order, on_bad_image=on_bad_image, seed=seed
    )
    return train, val
