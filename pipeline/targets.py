"""Stage 0, targets: detect the host, resolve `--target` to a preset from `targets/` or a raw TVM dict.

A preset is a *target class* (x86-avx512, aarch64-dotprod, cuda-sm80, ...): the TVM target dict with a
normalised `mcpu`, so tuning logs recorded on one machine of the class apply to every other, plus the
MetaSchedule settings that suit it. `num-cores` is filled in per machine at resolve time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pipeline.errors import UserError
from pipeline.runtime import physical_cores

log = logging.getLogger(__name__)

PRESETS_DIR = Path(os.environ.get("PIPELINE_TARGETS_DIR", Path(__file__).resolve().parent.parent / "targets"))
_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


@dataclass(frozen=True)
class HostInfo:
    arch: str
    cpu_name: str
    features: frozenset[str]
    physical_cores: int
    logical_cores: int
    cuda_arch: str | None = None      # e.g. "sm_80" when a CUDA device is present
    cuda_name: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    arch: str
    requires: tuple[str, ...]
    rank: int
    target: dict
    host: dict | None = None
    tuning: dict = field(default_factory=dict)
    schedules: str = ""         # the default schedule rules and tuning space that suit it
    ceilings: dict = field(default_factory=dict)   # published peak compute / bandwidth, if known

    @classmethod
    def from_file(cls, path: Path) -> Preset:
        d = json.loads(path.read_text())
        return cls(name=d["name"], description=d["description"], arch=d["arch"],
                   requires=tuple(d["requires"]), rank=int(d["rank"]), target=d["target"],
                   host=d.get("host"), tuning=d.get("tuning", {}), schedules=d.get("schedules", ""),
                   ceilings=d.get("ceilings", {}))


@dataclass(frozen=True)
class ResolvedTarget:
    preset: str                 # names the tuning-log folder
    target_dict: dict           # what tvm.target.Target gets, num-cores included
    host_dict: dict | None
    reason: str                 # why `auto` (or the user) picked this
    tuning: dict                # MetaSchedule settings of the preset

    @property
    def kind(self) -> str:
        return self.target_dict["kind"]

    @property
    def cores(self) -> int:
        """The threads the target was resolved for (`num-cores`; 1 for non-CPU targets)."""
        return int(self.target_dict.get("num-cores", 1))

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target_dict, host=self.host_dict) if self.host_dict \
            else tvm.target.Target(self.target_dict)

    def runs_here(self, host: HostInfo) -> bool:
        """Whether modules for this target can be loaded and measured on this machine."""
        if self.kind == "cuda":
            return host.cuda_arch is not None
        triple = self.target_dict.get("mtriple", "")
        return not triple or triple.split("-")[0] == host.arch


def load_presets(directory: Path = PRESETS_DIR) -> dict[str, Preset]:
    presets = {}
    for path in sorted(directory.glob("*.json")):
        p = Preset.from_file(path)
        presets[p.name] = p
    return presets


def _detect_cuda() -> tuple[str | None, str | None]:
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + dev.compute_version.replace(".", ""), dev.device_name
    except Exception as exc:  # noqa: BLE001  no libcuda, no driver: simply no GPU
        log.debug("no CUDA device: %s", exc)
    return None, None


@lru_cache(maxsize=1)
def detect_host() -> HostInfo:
    import cpuinfo
    import psutil

    info = cpuinfo.get_cpu_info()
    arch = _ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower())
    cuda_arch, cuda_name = _detect_cuda()
    logical = psutil.cpu_count(logical=True) or 1
    return HostInfo(arch=arch, cpu_name=info.get("brand_raw", "unknown"),
                    features=frozenset(f.lower() for f in info.get("flags", [])),
                    physical_cores=physical_cores(), logical_cores=logical,
                    cuda_arch=cuda_arch, cuda_name=cuda_name)


def _with_cores(preset: Preset, host: HostInfo) -> dict:
    target = dict(preset.target)
    if target["kind"] == "llvm":
        target.setdefault("num-cores", host.physical_cores)
    return target


def pick_auto(host: HostInfo, presets: dict[str, Preset]) -> tuple[Preset, str]:
    """The most specific preset the host satisfies; a CUDA device wins over the CPU."""
    if host.cuda_arch:
        gpu = [p for p in presets.values() if p.arch == "cuda"
               and int(p.requires[0][3:]) <= int(host.cuda_arch[3:])]
        if gpu:
            best = max(gpu, key=lambda p: p.rank)
            return best, (f"CUDA device {host.cuda_name} ({host.cuda_arch}) found: picked CUDA "
                          f"{best.requires[0]} over the {host.arch} CPU")
    cpu = [p for p in presets.values() if p.arch == host.arch and set(p.requires) <= host.features]
    if not cpu:
        raise UserError(f"no preset in {PRESETS_DIR} matches this {host.arch} CPU; "
                        "pass --target NAME or a JSON target dict")
    best = max(cpu, key=lambda p: p.rank)
    why = (f"{host.arch} CPU '{host.cpu_name}' has {', '.join(best.requires)}"
           f"{'' if host.cuda_arch else '; no CUDA device'}; {host.physical_cores} physical cores")
    return best, why


def resolve_target(spec: str, host: HostInfo | None = None) -> ResolvedTarget:
    """`auto`, a preset name, or a raw TVM target as JSON (`{"kind": "llvm", ...}`)."""
    presets = load_presets()
    host = host or detect_host()
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            target = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise UserError(f"--target is not valid JSON: {exc}") from exc
        if not isinstance(target, dict) or "kind" not in target:
            raise UserError('--target JSON must be an object with a "kind", e.g. {"kind": "llvm"}')
        _validate(target)
        if target["kind"] == "llvm":
            target.setdefault("num-cores", host.physical_cores)
        digest = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:8]
        # settings of the most generic preset of the same kind (cuda or llvm)
        same_kind = [p for p in presets.values() if p.target["kind"] == target["kind"]]
        tuning = min(same_kind, key=lambda p: p.rank).tuning if same_kind else {}
        return ResolvedTarget(f"custom-{target['kind']}-{digest}", target, None, "raw target dict", tuning)
    if spec == "auto":
        preset, why = pick_auto(host, presets)
    elif spec in presets:
        preset, why = presets[spec], "chosen by name"
    else:
        raise UserError(f"unknown target {spec!r}: use auto, a JSON target dict, or one of "
                        f"{', '.join(presets)}")
    return ResolvedTarget(preset.name, _with_cores(preset, host), preset.host, why, preset.tuning)


def _validate(target: dict) -> None:
    import tvm

    try:
        tvm.target.Target(target)
    except Exception as exc:
        raise UserError(f"TVM rejects the target {json.dumps(target)}: "
                        f"{str(exc).strip().splitlines()[-1]}") from exc
