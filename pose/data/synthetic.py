"""Procedurally drawn people written in the real COCO and MPII layouts.

Each person is an articulated figure (head, torso, upper/lower arms and legs drawn as filled
ellipses) with randomised proportions, a plausible random pose, clothing colours and a face
that shows whether the figure faces the camera (the only left/right cue, as for real people).
Several people per image, drawn in depth order over textured backgrounds with clutter and
foreground occluders; a joint's visibility flag comes from an owner map of who painted each
pixel last, so "occluded" (v=1) and "visible" (v=2) are exact. Joints outside the image are
unlabelled (v=0), as in COCO. The files are read back by the same readers as the real datasets.

Two difficulty levels (``LEVELS``): ``standard`` is the generator as it has always been (same random
draws, same files, same cache folder); ``easy`` draws one person per image over a plainer background
without foreground occluders and with less truncation, so that a short CPU training run learns enough
for network capacity to show in PCKh (the architecture-ranking proxy, ``pose.proxy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.io import savemat

from pose.keypoints import COCO, MPII, MPII_MAT_NAMES

GENERATOR_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_IMAGE_SIZE = 256

# Internal skeleton points, from which both COCO and MPII joint sets are derived.
POINTS = (
    "head_top",
    "nose",
    "l_eye",
    "r_eye",
    "l_ear",
    "r_ear",
    "neck",
    "l_shoulder",
    "r_shoulder",
    "l_elbow",
    "r_elbow",
    "l_wrist",
    "r_wrist",
    "l_hip",
    "r_hip",
    "l_knee",
    "r_knee",
    "l_ankle",
    "r_ankle",
    "pelvis",
    "thorax",
)
P = {name: i for i, name in enumerate(POINTS)}
COCO_FROM_POINTS = [P[n] for n in ("nose", "l_eye", "r_eye", "l_ear", "r_ear")] + [
    P[f"{side}_{part}"] for part in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle") for side in ("l", "r")
]
MPII_FROM_POINTS = [P["neck" if name == "upper_neck" else name] for name in MPII.joints]  # MPII order, one source
assert len(COCO_FROM_POINTS) == COCO.num_joints and len(MPII_FROM_POINTS) == MPII.num_joints

SKIN = ((224, 172, 105), (198, 134, 66), (141, 85, 36), (241, 194, 125), (255, 219, 172), (92, 58, 30))
HAIR = ((20, 20, 20), (70, 40, 20), (160, 110, 50), (200, 180, 120), (110, 110, 110))


@dataclass(frozen=True)
class Level:
    """How crowded and cluttered an image is; ranges are ``rng.integers(low, high)`` bounds."""

    name: str
    people: tuple[int, int]  # people per image
    clutter: tuple[int, int]  # background boxes, discs and limb-like blobs per image
    occluders: bool  # poles, boxes and discs painted in front of the people
    truncation: float  # probability that a figure may stand partly outside the image


LEVELS = {
    "standard": Level("standard", people=(1, 5), clutter=(3, 12), occluders=True, truncation=0.25),
    "easy": Level("easy", people=(1, 2), clutter=(0, 4), occluders=False, truncation=0.1),
}
DEFAULT_LEVEL = "standard"


def get_level(level: str | Level) -> Level:
    if isinstance(level, Level):
        return level
    if level not in LEVELS:
        raise ValueError(f"unknown synthetic difficulty level {level!r}: expected one of {', '.join(LEVELS)}")
    return LEVELS[level]


@dataclass
class Person:
    points: np.ndarray  # (len(POINTS), 2) float image coordinates
    facing_camera: bool
    head_radius: float
    limb_width: float


def _rot(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _random_person(rng: np.random.Generator, size: int, truncation: float = 0.25) -> Person:
    """A plausible pose: upright-ish torso, arms and legs with random but anatomical joint angles."""
    height = rng.uniform(0.3, 0.9) * size
    unit = height / 7.5  # a head height
    j = lambda scale: scale * unit * rng.uniform(0.87, 1.15)  # noqa: E731
    torso, shoulder_w, hip_w = j(2.6), j(1.9), j(1.3)
    upper_arm, forearm, thigh, shin, neck_len = j(1.45), j(1.3), j(1.9), j(1.8), j(0.35)
    head_r = unit * rng.uniform(0.42, 0.52)
    tilt = rng.normal(0, 0.25) if rng.random() < 0.9 else rng.uniform(-1.6, 1.6)
    facing = bool(rng.random() < 0.8)
    lean = rng.normal(0, 0.12)  # torso bend relative to the hips
    down = np.array([0.0, 1.0])
    # Centre the figure at a random spot; sometimes partly outside the image (truncation).
    margin = -0.15 * size if rng.random() < truncation else 0.1 * size
    center = rng.uniform(margin, size - margin, 2)
    pelvis = center + _rot(tilt) @ np.array([0.0, 0.3 * height * 0.5])
    torso_dir = _rot(tilt + lean) @ -down
    thorax = pelvis + torso_dir * torso * 0.82
    neck = pelvis + torso_dir * torso
    side = _rot(tilt + lean) @ np.array([1.0, 0.0])  # image-right in the figure's frame
    # Facing the camera: the person's left is on the image right.
    lr = 1.0 if facing else -1.0
    pts = np.zeros((len(POINTS), 2))
    pts[P["pelvis"]], pts[P["thorax"]], pts[P["neck"]] = pelvis, thorax, neck
    head_c = neck + torso_dir * (neck_len + head_r * 0.95) + side * rng.normal(0, 0.1) * head_r
    pts[P["head_top"]] = head_c + torso_dir * head_r
    face_dir = rng.normal(0, 0.25) * head_r  # small head turn
    pts[P["nose"]] = head_c - torso_dir * head_r * 0.15 + side * face_dir
    for name, sign in (("l", lr), ("r", -lr)):
        pts[P[f"{name}_eye"]] = head_c + torso_dir * head_r * 0.25 + side * (sign * head_r * 0.38 + face_dir * 0.8)
        pts[P[f"{name}_ear"]] = head_c + side * sign * head_r * 0.95
        shoulder = thorax + torso_dir * torso * 0.08 + side * sign * shoulder_w / 2
        hip = pelvis + side * sign * hip_w / 2
        # Arms: abduction from hanging down, elbow flexes forward/up.
        a1 = tilt + lean + sign * rng.uniform(-0.3, 2.6)
        a2 = a1 + sign * rng.uniform(-0.2, 2.4) * (1 if rng.random() < 0.7 else -1)
        elbow = shoulder + _rot(a1) @ down * upper_arm
        wrist = elbow + _rot(a2) @ down * forearm
        # Legs: hip abduction and knee flexion within human range.
        l1 = tilt + sign * rng.uniform(-0.25, 0.7) * (1 if rng.random() < 0.85 else 1.8)
        l2 = l1 - sign * rng.uniform(-0.1, 1.6) * (0.4 if rng.random() < 0.6 else 1.0)
        knee = hip + _rot(l1) @ down * thigh
        ankle = knee + _rot(l2) @ down * shin
        for part, value in (("shoulder", shoulder), ("hip", hip), ("elbow", elbow), ("wrist", wrist)):
            pts[P[f"{name}_{part}"]] = value
        pts[P[f"{name}_knee"]], pts[P[f"{name}_ankle"]] = knee, ankle
    return Person(points=pts, facing_camera=facing, head_radius=head_r, limb_width=unit * rng.uniform(0.4, 0.55))


def _colour(rng: np.random.Generator, base=None, jitter: int = 25) -> tuple[int, int, int]:
    if base is None:
        return tuple(int(v) for v in rng.integers(0, 256, 3))
    return tuple(int(np.clip(v + rng.integers(-jitter, jitter + 1), 0, 255)) for v in base)


def _limb(canvases, a: np.ndarray, b: np.ndarray, width: float, values) -> None:
    mid = (a + b) / 2
    length = float(np.linalg.norm(b - a))
    angle = float(np.degrees(np.arctan2(b[1] - a[1], b[0] - a[0])))
    axes = (max(1, int(length / 2 + width * 0.35)), max(1, int(width / 2)))
    centre = (int(round(mid[0])), int(round(mid[1])))
    for canvas, value in zip(canvases, values, strict=True):
        cv2.ellipse(canvas, centre, axes, angle, 0, 360, value, -1, cv2.LINE_AA if canvas.ndim == 3 else 8)


def _disc(canvases, c: np.ndarray, radius: float, values) -> None:
    for canvas, value in zip(canvases, values, strict=True):
        cv2.circle(canvas, (int(round(c[0])), int(round(c[1]))), max(1, int(radius)), value, -1)


def _draw_person(image: np.ndarray, owner: np.ndarray, own: np.ndarray, person: Person, pid: int, rng) -> None:
    """Paint limbs back to front; ``owner`` records the last painter of each pixel, ``own`` this person's mask."""
    pts = person.points
    skin = _colour(rng, SKIN[rng.integers(len(SKIN))], 15)
    shirt, trousers = _colour(rng), _colour(rng)
    shoes = _colour(rng, (40, 40, 40), 40)
    hair = _colour(rng, HAIR[rng.integers(len(HAIR))], 15)
    w = person.limb_width
    canv = (image, owner, own)

    def vals(colour):
        return (colour, pid, 1)

    for side in ("l", "r"):
        _limb(canv, pts[P[f"{side}_hip"]], pts[P[f"{side}_knee"]], w * 1.25, vals(_colour(rng, trousers, 12)))
        _limb(canv, pts[P[f"{side}_knee"]], pts[P[f"{side}_ankle"]], w * 1.05, vals(_colour(rng, trousers, 12)))
        _disc(canv, pts[P[f"{side}_ankle"]], w * 0.55, vals(shoes))
    # Torso: a filled quadrilateral from shoulders to hips, plus the neck.
    quad = np.array([pts[P["l_shoulder"]], pts[P["r_shoulder"]], pts[P["r_hip"]], pts[P["l_hip"]]])
    hull = cv2.convexHull(np.round(quad).astype(np.int32))
    for canvas, value in zip(canv, vals(shirt), strict=True):
        cv2.fillConvexPoly(canvas, hull, value)
    _limb(canv, pts[P["thorax"]], pts[P["pelvis"]], w * 2.0, vals(shirt))
    _limb(canv, pts[P["neck"]], pts[P["thorax"]], w * 0.9, vals(skin))
    # Head: face (eyes, nose) when facing the camera, hair only when seen from behind.
    head_c = pts[P["head_top"]] + (pts[P["neck"]] - pts[P["head_top"]]) * 0.45
    _disc(canv, head_c, person.head_radius, vals(skin if person.facing_camera else hair))
    for side in ("l", "r"):
        _disc(canv, pts[P[f"{side}_ear"]], person.head_radius * 0.25, vals(skin))
    if person.facing_camera:
        _disc(canv, head_c + (pts[P["head_top"]] - head_c) * 0.9, person.head_radius * 0.55, vals(hair))
        for side in ("l", "r"):
            _disc((image,), pts[P[f"{side}_eye"]], max(1.0, person.head_radius * 0.13), ((15, 15, 15),))
        _disc((image,), pts[P["nose"]], max(1.0, person.head_radius * 0.11), (_colour(rng, (150, 60, 50), 20),))
    for side in ("l", "r"):
        sleeve = _colour(rng, shirt, 12)
        _limb(canv, pts[P[f"{side}_shoulder"]], pts[P[f"{side}_elbow"]], w * 1.05, vals(sleeve))
        _limb(canv, pts[P[f"{side}_elbow"]], pts[P[f"{side}_wrist"]], w * 0.85, vals(_colour(rng, skin, 10)))
        _disc(canv, pts[P[f"{side}_wrist"]], w * 0.5, vals(skin))


def _background(rng: np.random.Generator, size: int, clutter: tuple[int, int] = (3, 12)) -> np.ndarray:
    c1, c2 = np.array(_colour(rng), float), np.array(_colour(rng), float)
    t = np.linspace(0, 1, size)[:, None, None]
    image = c1 * (1 - t) + c2 * t
    if rng.random() < 0.5:
        image = image.transpose(1, 0, 2)
    noise = cv2.resize(rng.normal(0, 30, (8, 8, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + noise + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    image = np.ascontiguousarray(image)
    for _ in range(int(rng.integers(*clutter))):  # clutter: boxes, discs and limb-like blobs
        colour = _colour(rng)
        kind = rng.integers(3)
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if kind == 0:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(8, 80)), y + int(rng.integers(8, 80))), colour, -1)
        elif kind == 1:
            cv2.circle(image, (x, y), int(rng.integers(4, 30)), colour, -1)
        else:
            axes = (int(rng.integers(8, 40)), int(rng.integers(3, 10)))
            cv2.ellipse(image, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return image


def _occluders(image: np.ndarray, owner: np.ndarray, rng: np.random.Generator) -> None:
    size = image.shape[0]
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.5 else 0):
        colour = _colour(rng)
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:  # a pole or a box in front of people
            pt2 = (x + int(rng.integers(8, 40)), y + int(rng.integers(20, 160)))
            cv2.rectangle(image, (x, y), pt2, colour, -1)
            cv2.rectangle(owner, (x, y), pt2, -2, -1)
        else:
            r = int(rng.integers(10, 35))
            cv2.circle(image, (x, y), r, colour, -1)
            cv2.circle(owner, (x, y), r, -2, -1)


def draw_image(rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE, level: str | Level = DEFAULT_LEVEL):
    """One image and its people: returns (RGB uint8 image, [(points, labels 0/1/2, mask, facing, head box)])."""
    lv = get_level(level)
    image = _background(rng, size, lv.clutter)
    owner = np.full((size, size), -1, np.int32)
    people = [_random_person(rng, size, lv.truncation) for _ in range(int(rng.integers(*lv.people)))]
    people.sort(key=lambda p: p.points[:, 1].max())  # lower feet = nearer the camera = drawn later
    masks = []
    for pid, person in enumerate(people):
        own = np.zeros((size, size), np.uint8)
        _draw_person(image, owner, own, person, pid, rng)
        masks.append(own)
    if lv.occluders:
        _occluders(image, owner, rng)
    out = []
    for pid, person in enumerate(people):
        pts = person.points
        inside = (pts[:, 0] >= 0) & (pts[:, 0] <= size - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= size - 1)
        labels = np.zeros(len(POINTS), np.int64)
        xi = np.clip(np.round(pts[:, 0]).astype(int), 0, size - 1)
        yi = np.clip(np.round(pts[:, 1]).astype(int), 0, size - 1)
        labels[inside] = np.where(owner[yi[inside], xi[inside]] == pid, 2, 1)
        if not person.facing_camera:  # face keypoints of a person seen from behind are not annotated
            labels[[P["nose"], P["l_eye"], P["r_eye"]]] = 0
        visible_mask = (owner == pid).astype(np.uint8)
        head_c = pts[P["head_top"]] + (pts[P["neck"]] - pts[P["head_top"]]) * 0.45
        r = person.head_radius * 1.15
        head_box = np.array([[head_c[0] - r, head_c[1] - r], [head_c[0] + r, head_c[1] + r]])
        out.append((pts, labels, masks[pid], visible_mask, person.facing_camera, head_box))
    return image, out


def _bbox(mask: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_image(path: Path, image_rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise RuntimeError(f"cannot write image {path}")


def generate_coco(
    out: str | Path,
    images: int,
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_IMAGE_SIZE,
    progress=None,
    level: str = DEFAULT_LEVEL,
):
    """Write ``images`` training and ``max(1, images // 4)`` validation images in the COCO layout."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    image_id, ann_id = 1, 1
    described = f"effpose synthetic people (seed {seed})"
    if level != DEFAULT_LEVEL:
        described = f"effpose synthetic people (seed {seed}, level {level})"
    for split, count in (("train2017", images), ("val2017", max(1, images // 4))):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "info": {"description": described, "version": str(GENERATOR_VERSION)},
            "images": [],
            "annotations": [],
            "categories": [
                {
                    "id": 1,
                    "name": "person",
                    "supercategory": "person",
                    "keypoints": list(COCO.joints),
                    "skeleton": [[a + 1, b + 1] for a, b in COCO.skeleton],
                }
            ],
        }
        for _ in range(count):
            image, people = draw_image(rng, size, level)
            name = f"{image_id:012d}.jpg"
            _write_image(folder / name, image)
            doc["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
            for pts, labels, _full, visible_mask, _facing, _head in people:
                box = _bbox(visible_mask)
                if box is None:
                    continue
                kp = []
                for idx in COCO_FROM_POINTS:
                    v = int(labels[idx])
                    kp += [round(float(pts[idx, 0]), 2), round(float(pts[idx, 1]), 2), v] if v else [0, 0, 0]
                doc["annotations"].append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": 1,
                        "iscrowd": 0,
                        "bbox": box,
                        "area": float(visible_mask.sum()),
                        "keypoints": kp,
                        "num_keypoints": int(sum(1 for v in kp[2::3] if v > 0)),
                    }
                )
                ann_id += 1
            image_id += 1
            if progress is not None:
                progress.update(1)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(doc))
    return out


def generate_mpii(
    out: str | Path,
    images: int,
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_IMAGE_SIZE,
    progress=None,
    level: str = DEFAULT_LEVEL,
):
    """Write the MPII layout: images/, annot/{train,valid}.json (1-based, raw center/scale), annot/gt_valid.mat."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annot").mkdir(parents=True, exist_ok=True)
    index = 1
    for split, count in (("train", images), ("valid", max(1, images // 4))):
        entries, gt_joints, gt_missing, head_boxes = [], [], [], []
        for _ in range(count):
            image, people = draw_image(rng, size, level)
            name = f"{index:09d}.jpg"
            _write_image(out / "images" / name, image)
            index += 1
            for pts, labels, full_mask, _visible, _facing, head_box in people:
                joints = pts[MPII_FROM_POINTS]
                vis = labels[MPII_FROM_POINTS] > 0
                if vis.sum() < 4:
                    continue
                box = _bbox(full_mask)
                if box is None:
                    continue
                raw_scale = max(box[2], box[3]) / 200.0
                center = [box[0] + box[2] / 2, box[1] + box[3] / 2 - 15 * raw_scale]
                one_based = np.round(np.where(vis[:, None], joints + 1, -1.0), 2)
                entries.append(
                    {
                        "image": name,
                        "center": [round(center[0] + 1, 2), round(center[1] + 1, 2)],
                        "scale": round(raw_scale, 4),
                        "joints": np.round(one_based, 2).tolist(),
                        "joints_vis": vis.astype(int).tolist(),
                    }
                )
                gt_joints.append(one_based)
                gt_missing.append(~vis)
                head_boxes.append(head_box + 1)
            if progress is not None:
                progress.update(1)
        (out / "annot" / f"{split}.json").write_text(json.dumps(entries))
        if split == "valid":
            names = np.empty((1, len(MPII_MAT_NAMES)), dtype=object)
            names[0, :] = MPII_MAT_NAMES
            savemat(
                out / "annot" / "gt_valid.mat",
                {
                    "dataset_joints": names,
                    "jnt_missing": np.array(gt_missing, dtype=np.float64).T.reshape(16, -1),
                    "pos_gt_src": np.array(gt_joints, dtype=np.float64).transpose(1, 2, 0).reshape(16, 2, -1),
                    "headboxes_src": np.array(head_boxes, dtype=np.float64).transpose(1, 2, 0).reshape(2, 2, -1),
                },
            )
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("EFFPOSE_CACHE_DIR") or Path.home() / ".cache" / "effpose")


def synthetic_root(
    images: int,
    keypoints: str = "coco",
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_IMAGE_SIZE,
    level: str = DEFAULT_LEVEL,
) -> Path:
    """Generate once into the cache (atomically: temp folder, then rename) and return the dataset root.

    The default level keeps its cache key (and folder) from before levels existed."""
    if keypoints not in ("coco", "mpii"):
        raise ValueError(f"unknown keypoint layout {keypoints!r}: expected coco or mpii")
    if images < 1:
        raise ValueError(f"synthetic dataset needs at least 1 image, got {images}")
    get_level(level)
    fields = {"v": GENERATOR_VERSION, "n": images, "k": keypoints, "seed": seed, "size": size}
    if level != DEFAULT_LEVEL:
        fields["level"] = level
    key = json.dumps(fields)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f"{keypoints}-{images}" if level == DEFAULT_LEVEL else f"{keypoints}-{level}-{images}"
    root = cache_dir() / "synthetic" / f"{name}-{digest}"
    if (root / "DONE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        generate = generate_coco if keypoints == "coco" else generate_mpii
        generate(tmp, images, seed, size, level=level)
        (tmp / "DONE").write_text(key)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "DONE").is_file():  # a stale half-written folder: replace it
                shutil.rmtree(root, ignore_errors=True)
                os.rename(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
