"""The MLflow model registry: every verified artifact becomes a model version, and `champion` is an
alias (not a deprecated stage) on the fastest verified version of a model on a preset.

A registered model is `<model>-<preset>`: an artifact runs only on the target class it was compiled
for, so versions of one registered model are always comparable. Each version is an MLflow pyfunc
whose artifact is the exported folder; `mlflow.pyfunc.load_model("models:/<name>@champion")` loads
it (sha256 of every file checked) and `.predict(x)` runs the TVM module.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
CHAMPION = "champion"


def registered_name(model: str, preset: str) -> str:
    return f"{model}-{preset}"


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # the artifact runtime does not need MLflow; only registering does
    PythonModel = object


class TVMArtifactModel(PythonModel):
    """pyfunc wrapper over an exported artifact folder (artifact key "artifact")."""

    # The inputs are the artifact's own, checked against its manifest; without this MLflow warns
    # on every import that `predict` has no type hints to build a schema from.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pipeline.export import load_artifact

        self._artifact = load_artifact(Path(context.artifacts["artifact"]))

    def predict(self, context, model_input, params=None):
        """One array (single-input models) or a dict of arrays keyed by input name; returns the
        first output as an array, or a dict output name -> array when there are several."""
        names = self._artifact.input_names()
        if isinstance(model_input, dict):
            arrays = [np.asarray(model_input[n]) for n in names]
        else:
            arrays = [np.asarray(getattr(model_input, "values", model_input))]
        specs = self._artifact.manifest["inputs"]
        arrays = [a.astype(s["dtype"], copy=False).reshape(s["shape"]) for a, s in zip(arrays, specs)]
        outputs = self._artifact.model(arrays)
        out_names = [s["name"] for s in self._artifact.manifest["outputs"]]
        return outputs[0] if len(outputs) == 1 else dict(zip(out_names, outputs))


@dataclass
class Registered:
    name: str
    version: str


def register_artifact(client, run_id: str, folder: Path, model: str, preset: str,
                      variant: str, latency_ms: float, verified: bool) -> Registered:
    """Log `folder` as a pyfunc model under the run and register it as a new model version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = registered_name(model, preset)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(str(local), python_model=TVMArtifactModel(),
                                 artifacts={"artifact": str(folder)},
                                 pip_requirements=["apache-tvm==0.27.*"])
        client.log_artifacts(run_id, str(local), "model")
    try:
        client.create_registered_model(name, tags={"model": model, "preset": preset},
                                       description=f"{model} compiled by TVM for {preset}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(
        name, source, run_id=run_id,
        tags={"preset": preset, "variant": variant, "latency_ms": f"{latency_ms:.4f}",
              "verified": str(verified).lower(), "artifact": str(folder.resolve())})
    log.info("registered %s version %s", name, version.version)
    return Registered(name, str(version.version))


@dataclass
class Promotion:
    name: str
    version: str
    latency_ms: float
    previous: str | None          # the version that held the alias before, if any
    candidates: int


def promote_best(client, model: str, preset: str) -> Promotion:
    """Move `champion` to the verified version with the lowest latency."""
    from mlflow.exceptions import MlflowException

    from pipeline.errors import UserError

    name = registered_name(model, preset)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise UserError(f"no registered model {name}: {str(exc).splitlines()[0]}") from None
    verified = [v for v in versions if v.tags.get("verified") == "true" and "latency_ms" in v.tags]
    if not verified:
        raise UserError(f"no verified version of {name} to promote (run `tune run` first)")
    best = min(verified, key=lambda v: float(v.tags["latency_ms"]))
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, CHAMPION, best.version)
    return Promotion(name, str(best.version), float(best.tags["latency_ms"]),
                     None if previous is None else str(previous), len(verified))
