import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.errors import UnsupportedModelError, UserError
from pipeline.importer import import_model


def test_zoo_model_imports_with_specs():
    m = import_model("tiny-cnn")
    assert [s.name for s in m.inputs] == ["input"]
    assert m.inputs[0].shape == (1, 3, 16, 16) and m.outputs[0].shape == (1, 10)
    assert len(m.sha256) == 64 and m.mod["main"].attrs["num_input"] == 1


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        import_model(str(tmp_path / "nope.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(UserError, match="not a valid ONNX model"):
        import_model(str(bad))


def _det_model(path):
    node = helper.make_node("Det", ["x"], ["y"], name="my_det_node")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_unsupported_op_is_named_with_its_node(tmp_path):
    _det_model(tmp_path / "det.onnx")
    with pytest.raises(UnsupportedModelError, match=r"Det \(node my_det_node\)"):
        import_model(str(tmp_path / "det.onnx"))


def _dynamic_mlp(path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_symbolic_dims_default_to_one_or_take_overrides(tmp_path):
    _dynamic_mlp(tmp_path / "mlp.onnx")
    assert import_model(str(tmp_path / "mlp.onnx")).inputs[0].shape == (1, 4)
    assert import_model(str(tmp_path / "mlp.onnx"), input_shapes={"x": [8, 4]}).inputs[0].shape == (8, 4)
    with pytest.raises(UserError, match="unknown input"):
        import_model(str(tmp_path / "mlp.onnx"), input_shapes={"y": [1, 2]})


def test_torch_exported_bert_encoder_imports_and_matches_torch(tmp_path):
    """A real exporter's graph (Shape/ConstantOfShape/Expand/Where patterns) imports and computes
    the same as torch after the graph passes and compilation."""
    torch = pytest.importorskip("torch")
    import tvm

    from pipeline import tvm_compat
    from pipeline.build import build
    from pipeline.passes import apply_passes, graph_passes
    from pipeline.runtime import CompiledModel

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 32)
            self.pos = torch.nn.Embedding(16, 32)
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu",
                                                     batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, ids, mask):
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            return self.enc(self.emb(ids) + self.pos(pos), src_key_padding_mask=(mask == 0))

    torch.manual_seed(0)
    net = Encoder().eval()
    ids = torch.randint(0, 100, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.int64)
    mask[0, 12:] = 0
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(net, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamo=False, opset_version=17,
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ConstantOfShape", "Shape", "Where"} & ops  # the exporter patterns are really there

    tvm_compat.apply()
    model = import_model(str(path))
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = apply_passes(model.mod, target, graph_passes("NCHW"))
    built = build(mod, target)
    (out,) = CompiledModel(built.executable, list(built.params.values()))([ids.numpy(), mask.numpy()])
    with torch.no_grad():
        ref = net(ids, mask).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
