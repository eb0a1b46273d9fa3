import json

import numpy as np
import pytest

from pipeline.build import build
from pipeline.errors import UserError
from pipeline.export import check_writable, export_artifact, load_artifact, read_inputs


@pytest.fixture
def artifact(mlp_mod, tmp_path):
    model, mod, target = mlp_mod
    built = build(mod, target)
    x = np.ones((4, 32), np.float32)
    folder = export_artifact(tmp_path / "out", model_name="mlp", preset="test", executable=built.executable,
                             params=built.params, manifest={"inputs": [s.as_dict() for s in model.inputs],
                                                            "outputs": [s.as_dict() for s in model.outputs]},
                             verify_inputs={"x": x}, verify_outputs=[np.zeros((4, 32), np.float32)])
    return folder


def test_artifact_layout_and_manifest(artifact):
    assert artifact.name.startswith("mlp-test-")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.so", "params.bin", "verify.npz"}
    assert manifest["versions"]["apache-tvm"].startswith("0.27")
    assert manifest["param_order"]


def test_load_runs_and_detects_tampering(artifact):
    loaded = load_artifact(artifact)
    out = loaded.model([np.ones((4, 32), np.float32)])[0]
    assert out.shape == (4, 32) and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    with open(artifact / "params.bin", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match="does not match its sha256"):
        load_artifact(artifact)


def test_read_inputs_checks_shape_and_dtype(artifact, tmp_path):
    loaded = load_artifact(artifact)
    np.save(tmp_path / "ok.npy", np.zeros((4, 32), np.float32))
    assert read_inputs(loaded, tmp_path / "ok.npy")[0].shape == (4, 32)
    np.save(tmp_path / "bad.npy", np.zeros((2, 32), np.float32))
    with pytest.raises(UserError, match="expected float32"):
        read_inputs(loaded, tmp_path / "bad.npy")
    (tmp_path / "junk.npy").write_text("junk")
    with pytest.raises(UserError, match="not a .npy"):
        read_inputs(loaded, tmp_path / "junk.npy")


def test_not_an_artifact_and_unwritable(tmp_path):
    with pytest.raises(UserError, match="manifest.json is missing"):
        load_artifact(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not writable"):
        check_writable(tmp_path / "file" / "sub")
