"""What a LUT holds: its keys (``pose.space.table_keys``) and, per key, the ``pose.ops`` module to time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pose.ops import PoseHead, Stem, make_layer_op
from pose.space import SearchSpace, TableSpec, conv_out, fixed_parts, layer_cells


@dataclass(frozen=True)
class PlannedEntry:
    key: str
    kind: str  # "overhead", "stem", "head" or "mbconv"
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int, int]  # N, C, H, W
    stage: int | None = None  # searchable stage of an mbconv entry (first layer using the key)


def plan_entries(spec: TableSpec) -> list[PlannedEntry]:
    """One entry per key of ``pose.space.table_keys(spec)``, in that order: what a complete table holds.

    Layers with identical shapes share an entry; ``skip`` has none."""
    space, batch, input_hw = spec.space, spec.batch, spec.input_hw
    out_h, out_w = space.backbone_output_hw(input_hw)
    builders: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int, int]]] = {
        "stem": (lambda: Stem(space.stem_channels), (batch, 3, *input_hw)),
        "head": (
            lambda: PoseHead(space.out_channels, spec.joints, spec.head_widths, spec.head_style, spec.sic),
            (batch, space.out_channels, out_h, out_w),
        ),
        # The overhead entry is timed with ``timing.overhead_probe`` for the backend at hand.
        "overhead": (nn.Identity, (batch, 3, *input_hw)),
    }
    entries: dict[str, PlannedEntry] = {}
    for kind, key in fixed_parts(spec).items():
        if kind not in builders:  # pose.space gained a fixed part this module does not know how to build
            raise RuntimeError(f"fixed part {kind!r} ({key}) has no module to build here")
        build, shape = builders[kind]
        entries[key] = PlannedEntry(key, kind, build, shape)
    for layer, op, key in layer_cells(spec):
        if key not in entries:
            entries[key] = PlannedEntry(
                key,
                "mbconv",
                lambda op=op, layer=layer: make_layer_op(op, layer),
                (batch, layer.c_in, layer.in_h, layer.in_w),
                layer.stage,
            )
    return list(entries.values())


def largest_activation(spec: TableSpec) -> int:
    """Elements of the largest activation a profiled module would hold (expanded MBConv hidden at e6, the
    head), checked against a limit before anything is allocated."""
    from pose.space import EXPANSIONS, make_divisible

    space, input_hw = spec.space, spec.input_hw
    stem_elems = 32 * conv_out(input_hw[0], 2) * conv_out(input_hw[1], 2)
    biggest = max(3 * input_hw[0] * input_hw[1], stem_elems)
    for layer in space.layers(input_hw):
        hidden = make_divisible(layer.c_in * max(EXPANSIONS))
        biggest = max(biggest, hidden * layer.in_h * layer.in_w)
    h, w = space.backbone_output_hw(input_hw)
    c = space.out_channels
    for width in spec.head_widths:
        biggest = max(biggest, c * h * w * 6, width * h * w * 4)  # mbv2 head expands by 6 before upsampling
        h, w, c = h * 2, w * 2, width
    return spec.batch * biggest


def largest_weight(space: SearchSpace) -> int:
    """Weight elements of the biggest candidate op (1x1 expand + project at e6): grows with channels only."""
    from pose.space import EXPANSIONS, make_divisible

    biggest = 0
    for layer in space.layers((64, 64)):
        hidden = make_divisible(layer.c_in * max(EXPANSIONS))
        biggest = max(biggest, (layer.c_in + layer.c_out) * hidden + hidden * 49)
    return biggest
