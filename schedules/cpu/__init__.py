"""Default CPU schedule rules, most specific first."""

from __future__ import annotations


def cpu_rules() -> list:
    from tvm.s_tir.dlight.cpu import Reduction

    from schedules.cpu.conv2d import Conv2DNHWC
    from schedules.cpu.generic import ChannelsLastReduction, Injective
    from schedules.cpu.int8 import Int8Dot
    from schedules.cpu.matmul import Matmul
    from schedules.cpu.sparse import BsrMatmul
    from schedules.cpu.winograd import WinogradInputTransform, WinogradOutputTransform

    # DLight's CPU Reduction covers softmax / layer norm (row reductions): no need to write our own.
    return [BsrMatmul(), WinogradInputTransform(), WinogradOutputTransform(), Int8Dot(), Conv2DNHWC(), Matmul(), ChannelsLastReduction(), Reduction(), Injective()]
