"""pipeline/prune.py: magnitude pruning hits the asked sparsity, in elements and in whole blocks,
on MatMul, Gemm(transB) and 1x1 Conv weights; small tensors are left alone."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pipeline.errors import UserError
from pipeline.prune import prune_array, prune_model, sparsity_report


@pytest.mark.parametrize("block", [(1, 1), (1, 16), (4, 4), (3, 5)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_prune_array_hits_sparsity(block, sparsity):
    from pipeline.passes.sparse import block_sparsity

    w = np.random.default_rng(0).standard_normal((96, 80)).astype(np.float32)
    p = prune_array(w, sparsity, block)
    blocks = (-(-96 // block[0])) * (-(-80 // block[1]))
    assert block_sparsity(p, block) == pytest.approx(round(sparsity * blocks) / blocks)
    assert (p == 0).mean() == pytest.approx(sparsity, abs=0.03)
    kept = p != 0
    assert np.array_equal(p[kept], w[kept])                     # survivors are untouched
    if block == (1, 1):                                         # magnitude: the largest survive
        assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("mm_w", (64, 32)), ("gemm_w", (48, 32)), ("conv_w", (32, 48, 1, 1)),
              ("tiny_w", (8, 8)), ("bias", (48,)))]
    nodes = [helper.make_node("MatMul", ["x", "mm_w"], ["a"]),
             helper.make_node("Gemm", ["a", "gemm_w", "bias"], ["b"], transB=1),
             helper.make_node("Reshape", ["b", "shape"], ["c"]),
             helper.make_node("Conv", ["c", "conv_w"], ["d"])]
    inits.append(numpy_helper.from_array(np.array([1, 48, 1, 1], np.int64), "shape"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 64])],
                              [helper.make_tensor_value_info("d", 1, [1, 32, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_prune_model_all_linear_kinds():
    pruned = prune_model(_model(), 0.75, (1, 16), min_size=256)
    report = {r.name: r for r in sparsity_report(pruned, (1, 16), min_size=256)}
    assert set(report) == {"mm_w", "gemm_w", "conv_w"}          # tiny_w (64) and bias skipped
    for r in report.values():
        assert r.block_sparsity == pytest.approx(0.75, abs=0.02), r
    inits = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    # Gemm transB: blocks run along N = the rows of the stored [N, K] weight
    nonzeros_per_block = (inits["gemm_w"].T.reshape(32, 3, 16) != 0).sum(axis=2)
    assert set(np.unique(nonzeros_per_block)) <= {0, 16}
    onnx.checker.check_model(pruned)


def test_prune_rejects_bad_sparsity():
    with pytest.raises(UserError):
        prune_model(_model(), 1.5)
