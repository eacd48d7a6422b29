"""Search spaces, candidate ops, arch specs and LUT keys: the one definition the agent and search share.

Everything that names a layer or an op lives here so that a LUT key computed by the profiler agent
and one computed by the search always mean the same module (docs/design.md §4).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

KERNELS = (3, 5, 7)
EXPANSIONS = (3, 6)
SKIP = "skip"
MBCONV_OPS: tuple[str, ...] = tuple(f"k{k}e{e}" for k in KERNELS for e in EXPANSIONS)
CANDIDATE_OPS: tuple[str, ...] = MBCONV_OPS + (SKIP,)
_OP_RE = re.compile(r"^k(\d+)e(\d+)$")

STEM_WIDTH = 32  # 3x3 conv stride 2 (3 -> 32), then 3x3 depthwise (32), then 1x1 to the stem channels


def parse_op(op: str) -> tuple[int, int]:
    """Return (kernel, expansion) of an MBConv op name like ``k5e6``; raise ValueError otherwise."""
    match = _OP_RE.match(op)
    if match is None:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(CANDIDATE_OPS)}")
    kernel, expansion = int(match.group(1)), int(match.group(2))
    if kernel not in KERNELS or expansion not in EXPANSIONS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(CANDIDATE_OPS)}")
    return kernel, expansion


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` as MobileNet code does (never below 90%)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded conv with this stride (odd kernel, padding k//2)."""
    return math.ceil(size / stride)


@dataclass(frozen=True)
class Stage:
    channels: int
    stride: int
    layers: int


@dataclass(frozen=True)
class Layer:
    """One searchable layer at a concrete input size: what a candidate op is built and profiled at."""

    index: int  # 0-based over the whole backbone
    stage: int  # 0-based stage index
    position: int  # 0-based position inside the stage
    c_in: int
    c_out: int
    stride: int
    in_h: int
    in_w: int

    @property
    def out_h(self) -> int:
        return conv_out(self.in_h, self.stride)

    @property
    def out_w(self) -> int:
        return conv_out(self.in_w, self.stride)

    def skip_reason(self) -> str | None:
        """Why ``skip`` is illegal here, or None when it is legal."""
        if self.position == 0:
            return "skip is not allowed on the first layer of a stage"
        if self.stride != 1:
            return f"skip needs stride 1, layer has stride {self.stride}"
        if self.c_in != self.c_out:
            return f"skip needs C_in == C_out, layer maps {self.c_in} -> {self.c_out}"
        return None

    def legal_ops(self) -> tuple[str, ...]:
        return CANDIDATE_OPS if self.skip_reason() is None else MBCONV_OPS


class SpaceSpec(BaseModel):
    """A search space as data: stem channels plus ``[channels, first stride, layers]`` per stage."""

    name: str = "inline"
    stem_channels: int = Field(ge=1, le=4096)
    stages: list[tuple[int, int, int]] = Field(min_length=1, max_length=16)

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, stages: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        for i, (channels, stride, layers) in enumerate(stages):
            if not 1 <= channels <= 4096:
                raise ValueError(f"stage {i}: channels must be in 1..4096, got {channels}")
            if stride not in (1, 2):
                raise ValueError(f"stage {i}: stride must be 1 or 2, got {stride}")
            if not 1 <= layers <= 64:
                raise ValueError(f"stage {i}: layers must be in 1..64, got {layers}")
        return stages


@dataclass(frozen=True)
class SearchSpace:
    name: str
    stem_channels: int
    stages: tuple[Stage, ...]

    @property
    def num_layers(self) -> int:
        return sum(stage.layers for stage in self.stages)

    @property
    def out_channels(self) -> int:
        return self.stages[-1].channels

    @property
    def output_stride(self) -> int:
        stride = 2  # the stem
        for stage in self.stages:
            stride *= stage.stride
        return stride

    def layers(self, input_hw: tuple[int, int] = (256, 256)) -> list[Layer]:
        """Every searchable layer with its input shape for an image of ``input_hw``."""
        h, w = conv_out(input_hw[0], 2), conv_out(input_hw[1], 2)
        c_in = self.stem_channels
        out: list[Layer] = []
        for s, stage in enumerate(self.stages):
            for p in range(stage.layers):
                stride = stage.stride if p == 0 else 1
                out.append(Layer(len(out), s, p, c_in, stage.channels, stride, h, w))
                h, w = conv_out(h, stride), conv_out(w, stride)
                c_in = stage.channels
        return out

    def backbone_output_hw(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        last = self.layers(input_hw)[-1]
        return last.out_h, last.out_w

    def to_spec(self) -> SpaceSpec:
        return SpaceSpec(
            name=self.name,
            stem_channels=self.stem_channels,
            stages=[(s.channels, s.stride, s.layers) for s in self.stages],
        )


SMALL = SearchSpace("small", 16, (Stage(24, 2, 4), Stage(32, 2, 6), Stage(64, 2, 10), Stage(96, 1, 8)))
LARGE = SearchSpace("large", 24, (Stage(32, 2, 6), Stage(64, 2, 8), Stage(96, 2, 10), Stage(160, 1, 10)))
SPACES = {"small": SMALL, "large": LARGE}


def get_space(space: str | dict[str, Any] | SpaceSpec | SearchSpace) -> SearchSpace:
    """Resolve ``small``/``large``, a JSON file path, or an inline space; raise ValueError naming the problem."""
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, str):
        if space in SPACES:
            return SPACES[space]
        path = Path(space)
        if not path.is_file():
            raise ValueError(f"unknown search space {space!r}: expected 'small', 'large' or a JSON file")
        try:
            space = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"search space file {path} is not valid JSON: {exc}") from exc
    if isinstance(space, dict):
        try:
            space = SpaceSpec.model_validate(space)
        except ValidationError as exc:
            raise ValueError(f"invalid search space: {exc}") from exc
    if not isinstance(space, SpaceSpec):
        raise ValueError(f"invalid search space of type {type(space).__name__}")
    return SearchSpace(space.name, space.stem_channels, tuple(Stage(*s) for s in space.stages))


HeadStyle = Literal["plain", "mbv1", "mbv2"]


class ArchSpec(BaseModel):
    """A derived network: one op per searchable layer plus head options. Validated against its space."""

    space: str | SpaceSpec
    ops: list[str]
    head_widths: tuple[int, ...] = (64, 32)
    head_style: HeadStyle = "plain"
    sic: bool = True
    name: str | None = None
    color_order: Literal["RGB", "BGR"] = "RGB"

    @field_validator("head_widths")
    @classmethod
    def _check_widths(cls, widths: tuple[int, ...]) -> tuple[int, ...]:
        if not widths or any(w < 1 or w > 4096 for w in widths):
            raise ValueError(f"head_widths must be 1..4096 channels each, got {widths}")
        return widths

    @model_validator(mode="after")
    def _check_ops(self) -> ArchSpec:
        search_space = get_space(self.space)
        layers = search_space.layers()
        if len(self.ops) != len(layers):
            raise ValueError(
                f"space {search_space.name!r} has {len(layers)} searchable layers, arch lists {len(self.ops)} ops"
            )
        for layer, op in zip(layers, self.ops, strict=True):
            if op == SKIP:
                reason = layer.skip_reason()
                if reason is not None:
                    raise ValueError(f"layer {layer.index} (stage {layer.stage + 1}): {reason}")
            else:
                try:
                    parse_op(op)
                except ValueError as exc:
                    raise ValueError(f"layer {layer.index} (stage {layer.stage + 1}): {exc}") from None
        return self

    @property
    def search_space(self) -> SearchSpace:
        return get_space(self.space)

    @classmethod
    def load(cls, path: str | Path) -> ArchSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read arch spec {path}: {exc}") from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"invalid arch spec {path}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n")


def random_ops(space: SearchSpace, rng: random.Random) -> list[str]:
    """A uniformly random legal op per searchable layer (random-search baseline, LUT validation)."""
    return [rng.choice(layer.legal_ops()) for layer in space.layers()]


# ---------------------------------------------------------------------------------------------
# LUT keys: the single function that names a profiled module. Format, after ProxylessNAS/OFA:
#   mbconv-input:64x64x24-output:32x32x32-kernel:5-expand:3-stride:2-idskip:0-batch:1
#   stem-input:256x256x3-output:128x128x16-batch:1
#   head-input:16x16x96-output:64x64x16-widths:64,32-style:plain-sic:1-batch:1
#   overhead-input:256x256x3-batch:1   (fixed per-call cost of one inference, summed once per network)
# Shapes are HxWxC. dtype, backend and threads are stored beside the key, not inside it.
# Which keys a table holds is a function of its ``TableSpec`` (``table_keys``), defined once below.
# ---------------------------------------------------------------------------------------------


def layer_key(op: str, layer: Layer, batch: int = 1) -> str | None:
    """Key of ``op`` at ``layer``; None for ``skip``, which costs nothing and is never profiled."""
    if op == SKIP:
        return None
    kernel, expansion = parse_op(op)
    idskip = int(layer.stride == 1 and layer.c_in == layer.c_out)
    return (
        f"mbconv-input:{layer.in_h}x{layer.in_w}x{layer.c_in}-output:{layer.out_h}x{layer.out_w}x{layer.c_out}"
        f"-kernel:{kernel}-expand:{expansion}-stride:{layer.stride}-idskip:{idskip}-batch:{batch}"
    )


def stem_key(space: SearchSpace, input_hw: tuple[int, int], batch: int = 1) -> str:
    h, w = conv_out(input_hw[0], 2), conv_out(input_hw[1], 2)
    return f"stem-input:{input_hw[0]}x{input_hw[1]}x3-output:{h}x{w}x{space.stem_channels}-batch:{batch}"


def overhead_key(input_hw: tuple[int, int], batch: int = 1) -> str:
    """Key of the fixed per-inference cost (dispatch, session.run) that a network pays once, not once per op.

    The agent subtracts it from every op it times in isolation and stores it as its own entry.
    """
    return f"overhead-input:{input_hw[0]}x{input_hw[1]}x3-batch:{batch}"


def head_key(
    space: SearchSpace,
    input_hw: tuple[int, int],
    joints: int,
    head_widths: tuple[int, ...] = (64, 32),
    head_style: str = "plain",
    sic: bool = True,
    batch: int = 1,
) -> str:
    h, w = space.backbone_output_hw(input_hw)
    scale = 2 ** len(head_widths)
    widths = ",".join(str(x) for x in head_widths)
    return (
        f"head-input:{h}x{w}x{space.out_channels}-output:{h * scale}x{w * scale}x{joints}"
        f"-widths:{widths}-style:{head_style}-sic:{int(sic)}-batch:{batch}"
    )


@dataclass(frozen=True)
class TableSpec:
    """What identifies a cost table, besides the device and the backend that time it: the space, the
    input size and batch its modules run at, the head they end in, and the threads and dtype.

    The agent builds one table per spec (``lut_service``), the search reads one per spec (``search.cost``),
    and both name its keys with the functions below. ``space`` may be anything ``get_space`` resolves
    (``small``, ``large``, an inline ``SpaceSpec`` or dict, a JSON file); it is kept as a ``SearchSpace``.
    Sequences are kept as tuples, so equal specs compare and hash equal.
    """

    space: SearchSpace
    input_hw: tuple[int, int] = (256, 256)
    batch: int = 1
    joints: int = 16
    head_widths: tuple[int, ...] = (64, 32)
    head_style: HeadStyle = "plain"
    sic: bool = True
    threads: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if len(self.input_hw) != 2:
            raise ValueError(f"input_hw must be (height, width), got {self.input_hw!r}")
        set_field = object.__setattr__  # frozen: normalise once, here
        set_field(self, "space", get_space(self.space))
        set_field(self, "input_hw", (int(self.input_hw[0]), int(self.input_hw[1])))
        set_field(self, "head_widths", tuple(int(w) for w in self.head_widths))
        set_field(self, "sic", bool(self.sic))
        problems = [
            f"{name} must be >= 1, got {value}"
            for name, value in (("batch", self.batch), ("joints", self.joints), ("threads", self.threads))
            if value < 1
        ]
        if min(self.input_hw) < 1:
            problems.append(f"input_hw sides must be >= 1, got {self.input_hw}")
        if not self.head_widths or any(w < 1 or w > 4096 for w in self.head_widths):
            problems.append(f"head_widths must be 1..4096 channels each, got {self.head_widths}")
        if self.head_style not in get_args(HeadStyle):
            problems.append(f"head_style must be one of {', '.join(get_args(HeadStyle))}, got {self.head_style!r}")
        if problems:
            raise ValueError("invalid table spec: " + "; ".join(problems))

    @classmethod
    def for_arch(cls, arch: ArchSpec, **fields: Any) -> TableSpec:
        """The spec of ``arch``'s space and head; ``fields`` give the rest (input_hw, batch, joints...)."""
        return cls(arch.search_space, head_widths=arch.head_widths, head_style=arch.head_style, sic=arch.sic, **fields)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> TableSpec:
        """Read the fields ``as_fields`` writes (a LUT document or the agent's stored request carries them)."""
        return cls(
            fields["space"],
            tuple(fields["input"]),  # type: ignore[arg-type]
            int(fields["batch"]),
            int(fields["joints"]),
            tuple(fields["head_widths"]),
            fields["head_style"],
            bool(fields["sic"]),
            int(fields["threads"]),
            str(fields["dtype"]),
        )

    def as_fields(self, space_by_name: bool = False) -> dict[str, Any]:
        """The spec as the JSON fields of a LUT document (``input`` is [H, W], the space inline).

        ``space_by_name``: ``small``/``large`` as their name, as a client's request sends them."""
        builtin = SPACES.get(self.space.name) == self.space
        return {
            "space": self.space.name if space_by_name and builtin else self.space.to_spec().model_dump(mode="json"),
            "batch": self.batch,
            "threads": self.threads,
            "dtype": self.dtype,
            "input": list(self.input_hw),
            "joints": self.joints,
            "head_widths": list(self.head_widths),
            "head_style": self.head_style,
            "sic": self.sic,
        }

    def arch(self, ops: list[str], name: str | None = None) -> ArchSpec:
        """The network of this spec's space and head with these ops (validated: ValueError on a bad op)."""
        return ArchSpec(
            space=self.space.to_spec(),
            ops=ops,
            head_widths=self.head_widths,
            head_style=self.head_style,
            sic=self.sic,
            name=name,
        )


def fixed_parts(spec: TableSpec) -> dict[str, str]:
    """The key of each part every architecture of the spec has (``stem``, ``head``, per-call ``overhead``)."""
    return {
        "stem": stem_key(spec.space, spec.input_hw, spec.batch),
        "head": head_key(
            spec.space, spec.input_hw, spec.joints, spec.head_widths, spec.head_style, spec.sic, spec.batch
        ),
        "overhead": overhead_key(spec.input_hw, spec.batch),
    }


def fixed_keys(spec: TableSpec) -> list[str]:
    """Keys of the fixed cost of Eq. 5 (stem, head, per-call overhead), summed once per network."""
    return list(fixed_parts(spec).values())


def layer_cells(spec: TableSpec) -> list[tuple[Layer, str, str]]:
    """``(layer, op, key)`` of every legal op of every searchable layer, ``skip`` left out (it has no key)."""
    cells = []
    for layer in spec.space.layers(spec.input_hw):
        for op in layer.legal_ops():
            key = layer_key(op, layer, spec.batch)
            if key is not None:
                cells.append((layer, op, key))
    return cells


def space_keys(spec: TableSpec) -> list[str]:
    """Every unique searchable-layer key (layers with identical shapes share keys), in layer order."""
    return list(dict.fromkeys(key for _, _, key in layer_cells(spec)))


def table_keys(spec: TableSpec) -> list[str]:
    """Every unique key a complete table of ``spec`` holds, in table order: fixed keys, then layer keys.

    The one answer to "which keys does this table need": the agent plans and stores these, the search
    requires these."""
    return list(dict.fromkeys(fixed_keys(spec) + space_keys(spec)))


def arch_keys(arch: ArchSpec, spec: TableSpec) -> list[str]:
    """Keys whose LUT medians add up to the predicted latency of the whole network ``arch``.

    ``spec`` must describe ``arch``'s space and head (``TableSpec.for_arch``); ValueError otherwise.
    Layers with identical shapes and ops repeat their key: the list is summed, not deduplicated.
    """
    arch_head = (tuple(arch.head_widths), arch.head_style, arch.sic)
    spec_head = (spec.head_widths, spec.head_style, spec.sic)
    if arch.search_space != spec.space or arch_head != spec_head:
        raise ValueError(
            f"arch of space {arch.search_space.name!r}, head {arch_head} does not match the table spec of "
            f"space {spec.space.name!r}, head {spec_head}"
        )
    keys = fixed_keys(spec)
    for layer, op in zip(spec.space.layers(spec.input_hw), arch.ops, strict=True):
        key = layer_key(op, layer, spec.batch)
        if key is not None:
            keys.append(key)
    return keys


def parse_hw(text: str) -> tuple[int, int]:
    """Parse ``256x192`` (height x width) as used on the command line."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"expected HxW such as 256x192, got {text!r}")
    return int(match.group(1)), int(match.group(2))
