"""Workarounds for TVM 0.27 as shipped on PyPI, applied once per process before MetaSchedule runs.

1. `import tvm.s_tir.tensor_intrin` (which every TuneContext does) parses ~250 TVMScript kernels, and the
   parser calls `inspect.stack()` for each one. `inspect.stack()` resolves the source file and module of
   every frame on the stack, which costs ~50-100 s of CPU in total. The parser only needs the frames
   themselves and, for one frame, the source line, so we hand it a lazy stack: the import drops to ~3 s.
2. apache-tvm-ffi 0.1.15 segfaults in MetaSchedule's JSON serialiser; we refuse to run on it rather than
   crash mid-tuning (pyproject pins 0.1.14.x, this guards environments installed by hand).
"""

from __future__ import annotations

import inspect
import linecache
import sys
from importlib import metadata

from pipeline.errors import PipelineError

_applied = False


class _LazyFrameInfo:
    """The parts of inspect.FrameInfo the TVMScript parser reads, computed only when read."""

    __slots__ = ("frame",)

    def __init__(self, frame) -> None:
        self.frame = frame

    @property
    def lineno(self) -> int:
        return self.frame.f_lineno

    @property
    def filename(self) -> str:
        return self.frame.f_code.co_filename

    @property
    def function(self) -> str:
        return self.frame.f_code.co_name

    @property
    def code_context(self) -> list[str] | None:
        line = linecache.getline(self.filename, self.lineno)
        return [line] if line else None


def _lazy_stack(context: int = 1) -> list[_LazyFrameInfo]:
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append(_LazyFrameInfo(frame))
        frame = frame.f_back
    return frames


class _InspectWithLazyStack:
    """`inspect`, except that `stack()` is lazy; installed only in the TVMScript parser modules."""

    stack = staticmethod(_lazy_stack)

    def __getattr__(self, name: str):
        return getattr(inspect, name)


def check_tvm_ffi() -> None:
    version = metadata.version("apache-tvm-ffi")
    if version.startswith("0.1.15"):
        raise PipelineError(f"apache-tvm-ffi {version} segfaults MetaSchedule; "
                            "install apache-tvm-ffi==0.1.14.post1 (see pyproject.toml)")


def apply() -> None:
    """Idempotent; call before anything imports tvm.s_tir.tensor_intrin."""
    global _applied
    if _applied:
        return
    check_tvm_ffi()
    import tvm.relax.script.parser.entry as relax_entry
    import tvm.script.parser.ir.entry as ir_entry
    import tvm.tirx.script.parser.entry as tir_entry

    for module in (tir_entry, ir_entry, relax_entry):
        module.inspect = _InspectWithLazyStack()
    _applied = True
