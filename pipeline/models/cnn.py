"""Convolutional architectures: ResNet-18/50 (v1.5), MobileNetV2 and a tiny CNN for tests."""

from __future__ import annotations

import onnx

from pipeline.models.graph import GraphBuilder
from pipeline.models.registry import register_model


def _conv_bn(g: GraphBuilder, x: str, cin: int, cout: int, k: int, stride: int = 1,
             group: int = 1, act: str | None = "relu") -> str:
    y = g.batch_norm(g.conv(x, cin, cout, k, stride, group), cout)
    return {"relu": g.relu, "relu6": g.relu6, None: lambda t: t}[act](y)


def _head(g: GraphBuilder, x: str, channels: int, classes: int) -> str:
    pooled = g.op("GlobalAveragePool", [x], "gap")
    return g.gemm(g.op("Flatten", [pooled], "flatten", axis=1), channels, classes)


def _basic_block(g: GraphBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    y = _conv_bn(g, x, cin, cout, 3, stride)
    y = _conv_bn(g, y, cout, cout, 3, 1, act=None)
    short = x if stride == 1 and cin == cout else _conv_bn(g, x, cin, cout, 1, stride, act=None)
    return g.relu(g.op("Add", [y, short], "residual"))


def _bottleneck(g: GraphBuilder, x: str, cin: int, width: int, stride: int) -> str:
    cout = width * 4
    y = _conv_bn(g, x, cin, width, 1)
    y = _conv_bn(g, y, width, width, 3, stride)  # v1.5: the stride sits on the 3x3 conv
    y = _conv_bn(g, y, width, cout, 1, act=None)
    short = x if stride == 1 and cin == cout else _conv_bn(g, x, cin, cout, 1, stride, act=None)
    return g.relu(g.op("Add", [y, short], "residual"))


def _resnet(name: str, blocks: list[int], bottleneck: bool, batch: int, image: int, classes: int,
            seed: int) -> onnx.ModelProto:
    g = GraphBuilder(name, seed)
    x = _conv_bn(g, "input", 3, 64, 7, 2)
    x = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2**stage
        for i in range(n):
            stride = 2 if i == 0 and stage > 0 else 1
            if bottleneck:
                x, cin = _bottleneck(g, x, cin, width, stride), width * 4
            else:
                x, cin = _basic_block(g, x, cin, width, stride), width
    out = _head(g, x, cin, classes)
    return g.build([("input", "float32", [batch, 3, image, image])],
                   [(out, "float32", [batch, classes])])


@register_model("resnet18", "ResNet-18 image classifier (torchvision layout)", task="image")
def resnet18(batch: int = 1, image: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    return _resnet("resnet18", [2, 2, 2, 2], False, batch, image, classes, seed)


@register_model("resnet50", "ResNet-50 v1.5 image classifier (stride on the 3x3 conv)", task="image")
def resnet50(batch: int = 1, image: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    return _resnet("resnet50", [3, 4, 6, 3], True, batch, image, classes, seed)


@register_model("mobilenet_v2", "MobileNetV2 1.0 (inverted residuals, ReLU6)", task="image")
def mobilenet_v2(batch: int = 1, image: int = 224, classes: int = 1000, seed: int = 0
                 ) -> onnx.ModelProto:
    g = GraphBuilder("mobilenet_v2", seed)
    x = _conv_bn(g, "input", 3, 32, 3, 2, act="relu6")
    cin = 32
    # (expansion, channels, repeats, first stride) from the MobileNetV2 paper, table 2
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x if t == 1 else _conv_bn(g, x, cin, hidden, 1, act="relu6")
            y = _conv_bn(g, y, hidden, hidden, 3, stride, group=hidden, act="relu6")
            y = _conv_bn(g, y, hidden, c, 1, act=None)
            x = g.op("Add", [x, y], "residual") if stride == 1 and cin == c else y
            cin = c
    x = _conv_bn(g, x, cin, 1280, 1, act="relu6")
    out = _head(g, x, 1280, classes)
    return g.build([("input", "float32", [batch, 3, image, image])],
                   [(out, "float32", [batch, classes])])


@register_model("tiny-cnn", "Two conv blocks and a classifier; seconds to tune, for tests", task="image")
def tiny_cnn(batch: int = 1, image: int = 16, classes: int = 10, channels: int = 8, seed: int = 0
             ) -> onnx.ModelProto:
    g = GraphBuilder("tiny_cnn", seed)
    x = _conv_bn(g, "input", 3, channels, 3)
    x = g.op("MaxPool", [x], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    x = _conv_bn(g, x, channels, channels * 2, 3)
    out = _head(g, x, channels * 2, classes)
    return g.build([("input", "float32", [batch, 3, image, image])],
                   [(out, "float32", [batch, classes])])
