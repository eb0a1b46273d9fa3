"""The model zoo registry: a name maps to a function that builds an ONNX graph with seeded weights."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from pipeline.errors import UserError

ModelFactory = Callable[..., onnx.ModelProto]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    task: str  # "image" or "text": decides which seeded inputs make sense
    factory: ModelFactory

    def options(self) -> dict[str, object]:
        """The factory's keyword options and their defaults (batch, image size, layers, ...)."""
        return {p.name: p.default for p in inspect.signature(self.factory).parameters.values()}

    def build(self, **options: object) -> onnx.ModelProto:
        unknown = set(options) - set(self.options())
        if unknown:
            raise UserError(f"model {self.name!r} has no option(s) {sorted(unknown)}; "
                            f"it takes {sorted(self.options())}")
        return self.factory(**options)


_ZOO: dict[str, ZooEntry] = {}


def register_model(name: str, description: str, task: str) -> Callable[[ModelFactory], ModelFactory]:
    def wrap(factory: ModelFactory) -> ModelFactory:
        _ZOO[name] = ZooEntry(name, description, task, factory)
        return factory
    return wrap


def get_model(name: str) -> ZooEntry:
    if name not in _ZOO:
        raise UserError(f"unknown model {name!r}: pass a .onnx path or one of {', '.join(_ZOO)}")
    return _ZOO[name]


def list_models() -> list[ZooEntry]:
    return list(_ZOO.values())
