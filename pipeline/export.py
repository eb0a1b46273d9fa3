"""Stage 8, export: a self-contained artifact folder, and loading it back with its hashes checked.

Layout of `<model>-<preset>-<utc timestamp>/`:
  model.so        the compiled Relax VM executable (host code and kernels)
  params.bin      weights, in the order `main` takes them after the inputs (tvm param dict)
  verify.npz      the verification inputs and the outputs the run checked against ONNX Runtime
  manifest.json   model sha256, target, input/output specs, versions, latencies, sha256 of each file
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(directory: Path) -> None:
    """Fail before hours of tuning, not after."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {directory} is not writable: {exc.strerror}") from exc


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def export_artifact(out_dir: Path, *, model_name: str, preset: str, executable,
                    params: dict[str, np.ndarray], manifest: dict,
                    verify_inputs: dict[str, np.ndarray], verify_outputs: list[np.ndarray],
                    cross_compiler: str | None = None) -> Path:
    import tvm

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = out_dir / f"{model_name}-{preset}-{stamp}"
    folder.mkdir(parents=True, exist_ok=False)
    kwargs = {"fcompile": tvm.support.cc.cross_compiler(cross_compiler)} if cross_compiler else {}
    executable.export_library(str(folder / "model.so"), **kwargs)
    tvm.runtime.save_param_dict_to_file({k: tvm.runtime.tensor(v) for k, v in params.items()},
                                        str(folder / "params.bin"))
    np.savez(folder / "verify.npz", **{f"input:{k}": v for k, v in verify_inputs.items()},
             **{f"output:{i}": v for i, v in enumerate(verify_outputs)})
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    full = {**manifest, "model": model_name, "preset": preset, "created_utc": stamp,
            "param_order": list(params), "versions": versions(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(full, indent=2, default=float) + "\n")
    log.info("exported %s", folder)
    return folder


@dataclass
class LoadedArtifact:
    folder: Path
    manifest: dict
    model: object  # pipeline.runtime.CompiledModel

    def input_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["inputs"]]


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not an artifact: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is corrupt: {exc}") from exc


def load_artifact(folder: Path, device: str | None = None) -> LoadedArtifact:
    """Check every file's sha256 against the manifest, then load the library and params (on the
    artifact's device: a one-line UserError when this machine lacks it, e.g. an aarch64 build on x86
    or a CUDA build without a GPU)."""
    import tvm

    from pipeline.cross import artifact_device
    from pipeline.runtime import CompiledModel, physical_cores, use_threads

    use_threads(physical_cores())
    manifest = read_manifest(folder)
    device = device or artifact_device(manifest)
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"artifact file missing: {path}")
        if sha256_file(path) != digest:
            raise UserError(f"artifact file {path} does not match its sha256 in {MANIFEST}")
    lib = tvm.runtime.load_module(str(folder / "model.so"))
    loaded = tvm.runtime.load_param_dict_from_file(str(folder / "params.bin"))
    params = [loaded[name].numpy() for name in manifest["param_order"]]
    return LoadedArtifact(folder, manifest, CompiledModel(lib, params, device))


def read_inputs(artifact: LoadedArtifact, path: Path) -> list[np.ndarray]:
    """`.npy` for a single-input model; `.npz` keyed by input name otherwise."""
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    specs = artifact.manifest["inputs"]
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not a .npy/.npz file: {exc}") from exc
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise UserError(f"the model takes {len(specs)} inputs: pass an .npz keyed by "
                            f"{', '.join(s['name'] for s in specs)}")
        arrays = [data]
    else:
        missing = [s["name"] for s in specs if s["name"] not in data.files]
        if missing:
            raise UserError(f"{path} lacks input(s) {missing}")
        arrays = [data[s["name"]] for s in specs]
    for arr, s in zip(arrays, specs):
        if list(arr.shape) != list(s["shape"]) or str(arr.dtype) != s["dtype"]:
            raise UserError(f"input {s['name']}: expected {s['dtype']}{s['shape']}, "
                            f"got {arr.dtype}{list(arr.shape)}")
    return arrays
