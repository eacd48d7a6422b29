"""The torch modules behind every op name in ``pose.space``: stem, MBConv candidates, skip, heads.

The agent profiles exactly these modules and the models are built from exactly these modules,
so a measured latency always belongs to the block that runs in the network.
"""

from __future__ import annotations

from torch import Tensor, nn

from pose.space import SKIP, STEM_WIDTH, Layer, make_divisible, parse_op


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Stem(nn.Sequential):
    """3x3 conv s2 (3->32) + BN + ReLU, 3x3 depthwise + BN + ReLU, 1x1 to ``c_out`` + BN (Table 1)."""

    def __init__(self, c_out: int, width: int = STEM_WIDTH) -> None:
        super().__init__(
            conv_bn(3, width, 3, stride=2),
            conv_bn(width, width, 3, groups=width),
            conv_bn(width, c_out, 1, relu=False),
        )


class MBConv(nn.Module):
    """Inverted residual as the authors built it: no SE, plain ReLU, bias-free convs, residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, kernel: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = make_divisible(c_in * expansion)
        self.use_residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            conv_bn(c_in, hidden, 1),
            conv_bn(hidden, hidden, kernel, stride=stride, groups=hidden),
            conv_bn(hidden, c_out, 1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


def make_op(op: str, c_in: int, c_out: int, stride: int) -> nn.Module:
    """Build the module for an op name; ``skip`` is the identity and needs stride 1 and C_in == C_out."""
    if op == SKIP:
        if stride != 1 or c_in != c_out:
            raise ValueError(f"skip needs stride 1 and C_in == C_out, got stride {stride}, {c_in} -> {c_out}")
        return nn.Identity()
    kernel, expansion = parse_op(op)
    return MBConv(c_in, c_out, kernel, expansion, stride)


def make_layer_op(op: str, layer: Layer) -> nn.Module:
    return make_op(op, layer.c_in, layer.c_out, layer.stride)


def _upsample_block(c_in: int, c_out: int, style: str) -> nn.Sequential:
    """One 2x upsampling step of the head: plain transposed conv, or the MBV1 / MBV2 variants of Table 8."""
    if style == "plain":
        return nn.Sequential(
            nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        )
    if style == "mbv1":  # depthwise transposed conv + pointwise conv (depthwise separable)
        return nn.Sequential(
            nn.ConvTranspose2d(c_in, c_in, 4, 2, 1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            conv_bn(c_in, c_out, 1),
        )
    if style == "mbv2":  # inverted residual: 1x1 expand, depthwise transposed conv, 1x1 project
        hidden = make_divisible(c_in * 6)
        return nn.Sequential(
            conv_bn(c_in, hidden, 1),
            nn.ConvTranspose2d(hidden, hidden, 4, 2, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            conv_bn(hidden, c_out, 1, relu=False),
            nn.ReLU(inplace=True),
        )
    raise ValueError(f"unknown head_style {style!r}; expected plain, mbv1 or mbv2")


class PoseHead(nn.Module):
    """Slim upsampling head (Sec. 3.3): 2x upsampling per width, optional SIC, 1x1 conv to K heatmaps."""

    def __init__(
        self,
        c_in: int,
        joints: int,
        widths: tuple[int, ...] = (64, 32),
        style: str = "plain",
        sic: bool = True,
    ) -> None:
        super().__init__()
        blocks = []
        for width in widths:
            blocks.append(_upsample_block(c_in, width, style))
            c_in = width
        self.upsample = nn.Sequential(*blocks)
        # SIC: a 3x3 depthwise conv (no bias, no BN) + ReLU that removes the checkerboard of the deconvs.
        self.sic = (
            nn.Sequential(nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.ReLU(inplace=True))
            if sic
            else nn.Identity()
        )
        self.final = nn.Conv2d(c_in, joints, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.final(self.sic(self.upsample(x)))
