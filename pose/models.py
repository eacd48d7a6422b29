"""Pose networks: the searched backbone built from an arch spec, the published presets, and baselines.

Presets are data (arch specs); ``build_model`` turns a preset name, a baseline name, an arch-spec
file or an ``ArchSpec`` into a torch module. Nothing is downloaded: all weights start random.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pose.ops import MBConv, PoseHead, Stem, conv_bn, make_layer_op
from pose.space import ArchSpec, SearchSpace

PRESETS: dict[str, ArchSpec] = {
    "efficientpose-a": ArchSpec(
        name="efficientpose-a",
        space="small",
        ops=(
            "k3e6 k7e3 k3e6 k3e3 "
            "k3e6 k3e3 k5e3 k3e3 k3e3 k3e3 "
            "k5e6 k7e3 k7e3 k7e3 k7e3 k7e3 k7e3 k7e3 skip skip "
            "k5e6 k5e6 k7e6 k5e6 k7e3 k7e3 k7e3 k7e6"
        ).split(),
    ),
    "efficientpose-b": ArchSpec(
        name="efficientpose-b",
        space="large",
        ops=(
            "k3e6 k3e6 k5e3 k7e3 k5e3 k7e3 "
            "k5e6 k5e3 k7e3 k7e3 k7e3 k7e3 k7e3 k7e3 "
            "k7e6 k5e6 k5e6 k7e3 k7e3 k3e6 k7e3 k7e6 k7e6 k7e3 "
            "k7e3 k7e3 k7e3 k7e3 k7e3 k7e3 skip k7e3 k7e6 k7e3"
        ).split(),
    ),
    "efficientpose-c": ArchSpec(
        name="efficientpose-c",
        space="large",
        ops=(
            "k5e3 k3e6 k3e3 k3e3 skip k5e3 "
            "k3e6 k7e6 k5e6 k3e6 k5e6 k3e6 k3e6 k3e6 "
            "k7e6 k7e6 k7e6 k7e6 k7e6 k7e6 k7e6 k7e6 k7e3 k7e6 "
            "k7e6 k7e6 k7e3 k7e3 k7e6 k7e6 k7e6 k7e6 k7e6 k7e6"
        ).split(),
    ),
}
BASELINES = ("mobilenetv2", "simplebaseline-r50")
MODEL_NAMES = tuple(PRESETS) + BASELINES


class PoseNet(nn.Module):
    """Backbone (stem + one op per searchable layer) followed by the slim head."""

    def __init__(self, arch: ArchSpec, joints: int = 16) -> None:
        super().__init__()
        space: SearchSpace = arch.search_space
        self.arch = arch
        self.joints = joints
        self.stem = Stem(space.stem_channels)
        layers = space.layers()
        self.layers = nn.ModuleList(make_layer_op(op, layer) for op, layer in zip(arch.ops, layers, strict=True))
        self.stage_of_layer = [layer.stage for layer in layers]
        self.head = PoseHead(space.out_channels, joints, arch.head_widths, arch.head_style, arch.sic)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class MobileNetV2Pose(nn.Module):
    """MobileNetV2 kept at output stride 16 (paper Table 3): its 160-wide stage runs at stride 1,
    the 320 block and the 1280 conv are dropped, then the slim head with SIC."""

    # t (expansion), c (channels), n (blocks), s (first stride); last row turned to stride 1 for OS 16
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1))

    def __init__(self, joints: int = 16, widths: tuple[int, ...] = (64, 32), sic: bool = True) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn(3, 32, 3, stride=2)]
        c_in = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                stride = s if i == 0 else 1
                if t == 1:  # the first block has no expansion conv
                    blocks.append(
                        nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in), conv_bn(c_in, c, 1, relu=False))
                    )
                else:
                    blocks.append(MBConv(c_in, c, 3, t, stride))
                c_in = c
        self.backbone = nn.Sequential(*blocks)
        self.head = PoseHead(c_in, joints, widths, "plain", sic)
        self.joints = joints

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.block = nn.Sequential(
            conv_bn(c_in, width, 1),
            conv_bn(width, width, 3, stride),
            conv_bn(width, c_out, 1, relu=False),
        )
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.block(x) + self.downsample(x))


class SimpleBaselineR50(nn.Module):
    """SimpleBaseline: ResNet-50 (output stride 32) + three 256-wide 4x4 deconvs + 1x1 conv to K joints."""

    def __init__(self, joints: int = 17) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        c_in = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(c_in, width, stride if i == 0 else 1))
                c_in = width * Bottleneck.expansion
        self.backbone = nn.Sequential(*layers)
        self.head = PoseHead(c_in, joints, (256, 256, 256), "plain", sic=False)
        self.joints = joints

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def resolve_arch(arch: str | Path | ArchSpec) -> ArchSpec | str:
    """A preset or file becomes an ``ArchSpec``; a baseline name stays a string."""
    if isinstance(arch, ArchSpec):
        return arch
    name = str(arch)
    if name in PRESETS:
        return PRESETS[name]
    if name in BASELINES:
        return name
    if Path(name).is_file():
        return ArchSpec.load(name)
    raise ValueError(
        f"unknown architecture {name!r}: expected a preset ({', '.join(PRESETS)}), "
        f"a baseline ({', '.join(BASELINES)}) or an arch-spec JSON file"
    )


def build_model(arch: str | Path | ArchSpec, joints: int = 16) -> nn.Module:
    """Build any model the CLI can name. Every model maps (N, 3, H, W) to (N, joints, H/4, W/4)."""
    resolved = resolve_arch(arch)
    if resolved == "mobilenetv2":
        return MobileNetV2Pose(joints)
    if resolved == "simplebaseline-r50":
        return SimpleBaselineR50(joints)
    assert isinstance(resolved, ArchSpec)
    return PoseNet(resolved, joints)


def zero_init_residuals(model: nn.Module) -> int:
    """Zero the last BN scale of every residual MBConv so each residual block starts as the identity.

    Goyal et al. 2017 ("zero-gamma", torchvision's ``zero_init_residual``): a deep network then starts
    as shallow as its non-residual path and trains about as fast as a shallow one, which a short
    proxy training needs to rank capacity instead of depth-dependent training speed. Returns the count.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, MBConv) and module.use_residual:
            nn.init.zeros_(module.block[-1][1].weight)  # conv_bn(hidden, c_out, relu=False): [conv, bn]
            count += 1
    return count


def arch_description(arch: str | Path | ArchSpec) -> dict:
    """JSON-able description stored with checkpoints so a model can be rebuilt without its source."""
    resolved = resolve_arch(arch)
    if isinstance(resolved, ArchSpec):
        return {"arch_spec": resolved.model_dump(mode="json", exclude_none=True)}
    return {"baseline": resolved}


def model_from_description(description: dict, joints: int) -> nn.Module:
    if "baseline" in description:
        return build_model(description["baseline"], joints)
    return build_model(ArchSpec.model_validate(description["arch_spec"]), joints)


@torch.no_grad()
def heatmap_shape(model: nn.Module, input_hw: tuple[int, int]) -> tuple[int, int, int]:
    was_training = model.training
    model.eval()
    out = model(torch.zeros(1, 3, *input_hw))
    model.train(was_training)
    return tuple(out.shape[1:])  # type: ignore[return-value]
