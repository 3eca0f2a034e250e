"""The zoo's convolutional models in plain PyTorch: ResNet/ResNeXt, SqueezeNet, Inception-v3, NASNet-A."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------------------------
# CNN building blocks and models
# ---------------------------------------------------------------------------------------------------------------


def conv_bn(in_ch: int, out_ch: int, kernel, stride=1, padding=0, groups: int = 1, eps: float = 1e-5, relu=True):
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, eps=eps),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet/ResNeXt bottleneck: 1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand, residual add."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, groups: int, width_per_group: int):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_ch = planes * self.expansion
        self.reduce = conv_bn(in_ch, width, 1)
        self.spatial = conv_bn(width, width, 3, stride, 1, groups=groups)
        self.expand = conv_bn(width, out_ch, 1, relu=False)
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride, relu=False) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.expand(self.spatial(self.reduce(x))) + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        stage_planes: tuple[int, ...],
        stem_channels: int,
        groups: int,
        width_per_group: int,
        num_classes: int,
    ):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem_channels, 7, 2, 3), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        in_ch = stem_channels
        for stage, (blocks, planes) in enumerate(zip(blocks_per_stage, stage_planes)):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(Bottleneck(in_ch, planes, stride, groups, width_per_group))
                in_ch = planes * Bottleneck.expansion
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.stages(self.stem(images))), 1))


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then parallel 1x1 and 3x3 expand convs on the same input, concatenated."""

    def __init__(self, in_ch: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(in_ch, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.out_channels = expand1x1 + expand3x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], dim=1)


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1 with every channel count divided by `width_divisor`."""

    def __init__(self, width_divisor: int, num_classes: int):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, channels // width_divisor)

        def pool() -> nn.Module:
            return nn.MaxPool2d(3, 2, ceil_mode=True)

        fire_specs = [(16, 64), (16, 64), None, (32, 128), (32, 128), None, (48, 192), (48, 192), (64, 256), (64, 256)]
        layers: list[nn.Module] = [nn.Conv2d(3, w(64), 3, stride=2), nn.ReLU(), pool()]
        in_ch = w(64)
        for spec in fire_specs:
            if spec is None:
                layers.append(pool())
                continue
            fire = Fire(in_ch, w(spec[0]), w(spec[1]), w(spec[1]))
            layers.append(fire)
            in_ch = fire.out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Conv2d(in_ch, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        # Without BatchNorm, PyTorch's default init shrinks activations layer after layer; He init keeps them O(1).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(images)), 1)


def inception_conv(in_ch: int, out_ch: int, kernel, stride=1, padding=0) -> nn.Module:
    return conv_bn(in_ch, out_ch, kernel, stride, padding, eps=0.001)


class InceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int, w: Callable[[int], int]):
        super().__init__()
        self.branch1x1 = inception_conv(in_ch, w(64), 1)
        self.branch5x5 = nn.Sequential(inception_conv(in_ch, w(48), 1), inception_conv(w(48), w(64), 5, padding=2))
        self.branch3x3dbl = nn.Sequential(
            inception_conv(in_ch, w(64), 1),
            inception_conv(w(64), w(96), 3, padding=1),
            inception_conv(w(96), w(96), 3, padding=1),
        )
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(in_ch, pool_features, 1))
        self.out_channels = w(64) + w(64) + w(96) + pool_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5(x), self.branch3x3dbl(x), self.branch_pool(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, in_ch: int, w: Callable[[int], int]):
        super().__init__()
        self.branch3x3 = inception_conv(in_ch, w(384), 3, stride=2)
        self.branch3x3dbl = nn.Sequential(
            inception_conv(in_ch, w(64), 1),
            inception_conv(w(64), w(96), 3, padding=1),
            inception_conv(w(96), w(96), 3, stride=2),
        )
        self.branch_pool = nn.MaxPool2d(3, 2)
        self.out_channels = w(384) + w(96) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl(x), self.branch_pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_ch: int, channels_7x7: int, w: Callable[[int], int]):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = inception_conv(in_ch, w(192), 1)
        self.branch7x7 = nn.Sequential(
            inception_conv(in_ch, c7, 1),
            inception_conv(c7, c7, (1, 7), padding=(0, 3)),
            inception_conv(c7, w(192), (7, 1), padding=(3, 0)),
        )
        self.branch7x7dbl = nn.Sequential(
            inception_conv(in_ch, c7, 1),
            inception_conv(c7, c7, (7, 1), padding=(3, 0)),
            inception_conv(c7, c7, (1, 7), padding=(0, 3)),
            inception_conv(c7, c7, (7, 1), padding=(3, 0)),
            inception_conv(c7, w(192), (1, 7), padding=(0, 3)),
        )
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(in_ch, w(192), 1))
        self.out_channels = 4 * w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch7x7(x), self.branch7x7dbl(x), self.branch_pool(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, in_ch: int, w: Callable[[int], int]):
        super().__init__()
        self.branch3x3 = nn.Sequential(inception_conv(in_ch, w(192), 1), inception_conv(w(192), w(320), 3, stride=2))
        self.branch7x7x3 = nn.Sequential(
            inception_conv(in_ch, w(192), 1),
            inception_conv(w(192), w(192), (1, 7), padding=(0, 3)),
            inception_conv(w(192), w(192), (7, 1), padding=(3, 0)),
            inception_conv(w(192), w(192), 3, stride=2),
        )
        self.branch_pool = nn.MaxPool2d(3, 2)
        self.out_channels = w(320) + w(192) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch7x7x3(x), self.branch_pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_ch: int, w: Callable[[int], int]):
        super().__init__()
        self.branch1x1 = inception_conv(in_ch, w(320), 1)
        self.branch3x3_reduce = inception_conv(in_ch, w(384), 1)
        self.branch3x3_a = inception_conv(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3_b = inception_conv(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_reduce = nn.Sequential(
            inception_conv(in_ch, w(448), 1), inception_conv(w(448), w(384), 3, padding=1)
        )
        self.branch3x3dbl_a = inception_conv(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_b = inception_conv(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(in_ch, w(192), 1))
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_reduce(x)
        b3dbl = self.branch3x3dbl_reduce(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_a(b3),
                self.branch3x3_b(b3),
                self.branch3x3dbl_a(b3dbl),
                self.branch3x3dbl_b(b3dbl),
                self.branch_pool(x),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """Inception-v3 (no auxiliary head). `channels_7x7` lists the InceptionC blocks; `blocks_a`/`blocks_e` count
    the InceptionA/E blocks; every channel count is divided by `width_divisor`."""

    def __init__(
        self, width_divisor: int, blocks_a: int, channels_7x7: tuple[int, ...], blocks_e: int, num_classes: int
    ):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, channels // width_divisor)

        layers: list[nn.Module] = [
            inception_conv(3, w(32), 3, stride=2),
            inception_conv(w(32), w(32), 3),
            inception_conv(w(32), w(64), 3, padding=1),
            nn.MaxPool2d(3, 2),
            inception_conv(w(64), w(80), 1),
            inception_conv(w(80), w(192), 3),
            nn.MaxPool2d(3, 2),
        ]
        in_ch = w(192)
        for index in range(blocks_a):
            block = InceptionA(in_ch, w(32) if index == 0 else w(64), w)
            layers.append(block)
            in_ch = block.out_channels
        blocks: list[nn.Module] = [InceptionB(in_ch, w)]
        in_ch = blocks[-1].out_channels
        for c7 in channels_7x7:
            blocks.append(InceptionC(in_ch, w(c7), w))
            in_ch = blocks[-1].out_channels
        blocks.append(InceptionD(in_ch, w))
        in_ch = blocks[-1].out_channels
        for _ in range(blocks_e):
            blocks.append(InceptionE(in_ch, w))
            in_ch = blocks[-1].out_channels
        self.features = nn.Sequential(*layers, *blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(images)), 1))


class SeparableConv(nn.Module):
    """NASNet separable conv: (ReLU, depthwise kxk, pointwise 1x1, BatchNorm) applied twice; stride on the first."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        super().__init__()
        pad = kernel // 2
        self.layers = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_ch, in_ch, kernel, stride, pad, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-3),
            nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, kernel, 1, pad, groups=out_ch, bias=False),
            nn.Conv2d(out_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def relu_conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Module:
    """1x1 projection of a cell input; stride 2 when the previous cell's output is at twice the resolution."""
    return nn.Sequential(nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch, eps=1e-3))


class NASNetNormalCell(nn.Module):
    """NASNet-A normal cell: five pairwise-added branches over the two previous cell outputs, concatenated."""

    def __init__(self, prev_ch: int, cur_ch: int, ch: int, prev_at_double_resolution: bool):
        super().__init__()
        self.prev_projection = relu_conv_bn(prev_ch, ch, 2 if prev_at_double_resolution else 1)
        self.cur_projection = relu_conv_bn(cur_ch, ch)
        self.comb0_sep3x3_cur = SeparableConv(ch, ch, 3)
        self.comb1_sep3x3_prev = SeparableConv(ch, ch, 3)
        self.comb1_sep5x5_cur = SeparableConv(ch, ch, 5)
        self.avg_pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.comb4_sep5x5_prev = SeparableConv(ch, ch, 5)
        self.comb4_sep3x3_prev = SeparableConv(ch, ch, 3)
        self.out_channels = 6 * ch

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        prev = self.prev_projection(prev)
        cur = self.cur_projection(cur)
        comb0 = self.comb0_sep3x3_cur(cur) + cur
        comb1 = self.comb1_sep3x3_prev(prev) + self.comb1_sep5x5_cur(cur)
        comb2 = self.avg_pool(cur) + prev
        comb3 = self.avg_pool(prev) + self.avg_pool(prev)
        comb4 = self.comb4_sep5x5_prev(prev) + self.comb4_sep3x3_prev(prev)
        return torch.cat([prev, comb0, comb1, comb2, comb3, comb4], 1)


class NASNetReductionCell(nn.Module):
    """NASNet-A reduction cell: strided separable convs and pools, halving the resolution."""

    def __init__(self, prev_ch: int, cur_ch: int, ch: int, prev_at_double_resolution: bool):
        super().__init__()
        self.prev_projection = relu_conv_bn(prev_ch, ch, 2 if prev_at_double_resolution else 1)
        self.cur_projection = relu_conv_bn(cur_ch, ch)
        self.comb0_sep7x7_prev = SeparableConv(ch, ch, 7, 2)
        self.comb0_sep5x5_cur = SeparableConv(ch, ch, 5, 2)
        self.comb1_sep7x7_prev = SeparableConv(ch, ch, 7, 2)
        self.comb2_sep5x5_prev = SeparableConv(ch, ch, 5, 2)
        self.comb3_sep3x3_comb0 = SeparableConv(ch, ch, 3)
        self.max_pool = nn.MaxPool2d(3, 2, 1)
        self.strided_avg_pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.avg_pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.out_channels = 4 * ch

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        prev = self.prev_projection(prev)
        cur = self.cur_projection(cur)
        comb0 = self.comb0_sep7x7_prev(prev) + self.comb0_sep5x5_cur(cur)
        comb1 = self.max_pool(cur) + self.comb1_sep7x7_prev(prev)
        comb2 = self.strided_avg_pool(cur) + self.comb2_sep5x5_prev(prev)
        comb3 = self.max_pool(cur) + self.comb3_sep3x3_comb0(comb0)
        comb4 = self.avg_pool(comb0) + comb1
        return torch.cat([comb1, comb2, comb3, comb4], 1)


class NASNetA(nn.Module):
    """NASNet-A (mobile layout): stem conv, two stem reduction cells, then three stages of `cells_per_stage`
    normal cells separated by reduction cells that double the channels."""

    def __init__(self, stem_channels: int, channels: int, cells_per_stage: int, num_classes: int):
        super().__init__()
        self.stem = conv_bn(3, stem_channels, 3, 2, 1, eps=1e-3, relu=False)
        cells: list[nn.Module] = []
        prev_ch = cur_ch = stem_channels
        prev_at_double_resolution = False

        def add(cell_type, ch: int) -> None:
            nonlocal prev_ch, cur_ch, prev_at_double_resolution
            cell = cell_type(prev_ch, cur_ch, ch, prev_at_double_resolution)
            cells.append(cell)
            prev_ch, cur_ch = cur_ch, cell.out_channels
            prev_at_double_resolution = cell_type is NASNetReductionCell

        add(NASNetReductionCell, channels // 4)
        add(NASNetReductionCell, channels // 2)
        for stage in range(3):
            if stage:
                add(NASNetReductionCell, channels * 2**stage)
            for _ in range(cells_per_stage):
                add(NASNetNormalCell, channels * 2**stage)
        self.cells = nn.ModuleList(cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cur_ch, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prev = cur = self.stem(images)
        for cell in self.cells:
            prev, cur = cur, cell(prev, cur)
        return self.classifier(torch.flatten(self.pool(torch.relu(cur)), 1))
