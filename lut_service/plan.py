"""What a LUT holds: its keys (from ``pose.space``) and, per key, the ``pose.ops`` module to time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pose.ops import PoseHead, Stem, make_layer_op
from pose.space import SearchSpace, conv_out, fixed_keys, head_key, layer_key, overhead_key, stem_key


@dataclass(frozen=True)
class PlannedEntry:
    key: str
    kind: str  # "overhead", "stem", "head" or "mbconv"
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int, int]  # N, C, H, W
    stage: int | None = None  # searchable stage of an mbconv entry (first layer using the key)


def lut_keys(
    space: SearchSpace,
    input_hw: tuple[int, int],
    batch: int,
    joints: int,
    head_widths: tuple[int, ...],
    head_style: str,
    sic: bool,
) -> list[str]:
    """Unique keys in table order: fixed keys (stem, head, overhead) first, then every searchable-layer key."""
    return [entry.key for entry in plan_entries(space, input_hw, batch, joints, head_widths, head_style, sic)]


def plan_entries(
    space: SearchSpace,
    input_hw: tuple[int, int],
    batch: int,
    joints: int,
    head_widths: tuple[int, ...],
    head_style: str,
    sic: bool,
) -> list[PlannedEntry]:
    """One entry per unique key; layers with identical shapes share an entry; ``skip`` has none."""
    head_widths = tuple(head_widths)
    out_h, out_w = space.backbone_output_hw(input_hw)
    fixed = {
        stem_key(space, input_hw, batch): PlannedEntry(
            stem_key(space, input_hw, batch), "stem", lambda: Stem(space.stem_channels), (batch, 3, *input_hw)
        ),
        head_key(space, input_hw, joints, head_widths, head_style, sic, batch): PlannedEntry(
            head_key(space, input_hw, joints, head_widths, head_style, sic, batch),
            "head",
            lambda: PoseHead(space.out_channels, joints, head_widths, head_style, sic),
            (batch, space.out_channels, out_h, out_w),
        ),
        # The overhead entry is timed with ``timing.overhead_probe`` for the backend at hand.
        overhead_key(input_hw, batch): PlannedEntry(
            overhead_key(input_hw, batch), "overhead", nn.Identity, (batch, 3, *input_hw)
        ),
    }
    keys = fixed_keys(space, input_hw, joints, head_widths, head_style, sic, batch)
    if set(keys) != set(fixed):  # pose.space gained a fixed part this module does not know how to build
        raise RuntimeError(f"fixed keys {keys} do not match the entries built here {list(fixed)}")
    entries = {key: fixed[key] for key in keys}
    for layer in space.layers(input_hw):
        for op in layer.legal_ops():
            key = layer_key(op, layer, batch)
            if key is None or key in entries:
                continue
            entries[key] = PlannedEntry(
                key,
                "mbconv",
                lambda op=op, layer=layer: make_layer_op(op, layer),
                (batch, layer.c_in, layer.in_h, layer.in_w),
                layer.stage,
            )
    return list(entries.values())


def largest_activation(space: SearchSpace, input_hw: tuple[int, int], batch: int, head_widths: tuple[int, ...]) -> int:
    """Elements of the largest activation a profiled module would hold (expanded MBConv hidden at e6, the
    head), checked against a limit before anything is allocated."""
    from pose.space import EXPANSIONS, make_divisible

    stem_elems = 32 * conv_out(input_hw[0], 2) * conv_out(input_hw[1], 2)
    biggest = max(3 * input_hw[0] * input_hw[1], stem_elems)
    for layer in space.layers(input_hw):
        hidden = make_divisible(layer.c_in * max(EXPANSIONS))
        biggest = max(biggest, hidden * layer.in_h * layer.in_w)
    h, w = space.backbone_output_hw(input_hw)
    c = space.out_channels
    for width in head_widths:
        biggest = max(biggest, c * h * w * 6, width * h * w * 4)  # mbv2 head expands by 6 before upsampling
        h, w, c = h * 2, w * 2, width
    return batch * biggest


def largest_weight(space: SearchSpace) -> int:
    """Weight elements of the biggest candidate op (1x1 expand + project at e6): grows with channels only."""
    from pose.space import EXPANSIONS, make_divisible

    biggest = 0
    for layer in space.layers((64, 64)):
        hidden = make_divisible(layer.c_in * max(EXPANSIONS))
        biggest = max(biggest, (layer.c_in + layer.c_out) * hidden + hidden * 49)
    return biggest
