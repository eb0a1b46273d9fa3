"""The sparse path: BSR packing round trip, the BSR kernel's numerics on odd shapes (sizes that are
not a multiple of the block, empty block rows, a fused epilogue), its tunable design space, the
Relax rewrite (threshold, decisions) and `tune prune` + `tune run --sparse auto` end to end."""

import json

import numpy as np
import pytest
import tvm
from tvm import relax

from pipeline.passes.sparse import (
    SparseSettings,
    block_sparsity,
    pack_bsr,
    parse_block,
    sparsify,
    to_bsr,
    unpack_bsr,
)
from pipeline.prune import prune_array
from tests.conftest import tune_cli


@pytest.fixture(scope="module")
def target():
    from pipeline.targets import resolve_target

    return resolve_target("auto").tvm_target()


def _sparse_weight(k, n, sparsity, block, seed=0, empty_cols=()):
    w = prune_array(np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32),
                    sparsity, block)
    for c in empty_cols:
        w[:, c] = 0
    return w


@pytest.mark.parametrize("shape,block", [((64, 48), (1, 16)), ((37, 45), (1, 16)),
                                         ((30, 20), (4, 8)), ((17, 33), (3, 5))])
def test_bsr_round_trip(shape, block):
    w = _sparse_weight(*shape, 0.7, block, empty_cols=range(16))
    packed = pack_bsr(w, block)
    assert np.array_equal(unpack_bsr(packed), w)
    assert np.array_equal(to_bsr(w, block).toarray().T[:shape[0], :shape[1]], w)
    assert packed.nnz_blocks == to_bsr(w, block).nnz // (block[0] * block[1])
    assert packed.padding >= 1


def test_all_zero_weight_packs():
    packed = pack_bsr(np.zeros((20, 32), np.float32), (1, 16))
    assert packed.length == 1 and packed.nnz_blocks == 0
    assert not unpack_bsr(packed).any()


def _run_kernel(target, lead, w, block):
    from schedules.cpu.sparse import BsrMatmul, bsr_matmul_func

    packed = pack_bsr(w, block)
    func = bsr_matmul_func(lead, w.shape[0], packed.blocks_n, packed.length, block)
    sch = BsrMatmul().apply(func, target, False)
    assert sch is not None
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=target)
    x = np.random.default_rng(1).standard_normal([*lead, w.shape[0]]).astype(np.float32)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, packed.data, packed.indices)]
    y = tvm.runtime.empty([*lead, packed.blocks_n * block[1]], "float32", dev)
    lib(*args, y)
    return y.numpy()[..., :w.shape[1]], x @ w


@pytest.mark.parametrize("lead,k,n,block", [
    ([7], 45, 37, (1, 16)),          # nothing a multiple of anything
    ([1, 5], 33, 64, (1, 16)),       # batch dims
    ([6], 30, 40, (4, 8)),           # R > 1 with K not a multiple of R
    ([3, 2], 64, 32, (2, 32)),       # C = two vectors
])
def test_kernel_numerics_odd_shapes(target, lead, k, n, block):
    w = _sparse_weight(k, n, 0.8, block, empty_cols=range(min(n, block[1])))  # an empty block row
    got, want = _run_kernel(target, lead, w, block)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_schedule_has_knobs(target):
    """tunable=True: the M tile and the block columns per task are sample_perfect_tile decisions
    (what schedules/space.py hands MetaSchedule); the default decisions are the untuned schedule."""
    from schedules.cpu.sparse import BsrMatmul, bsr_matmul_func

    packed = pack_bsr(_sparse_weight(64, 64, 0.8, (1, 16)), (1, 16))
    func = bsr_matmul_func([32], 64, packed.blocks_n, packed.length, (1, 16))
    sch = BsrMatmul().apply(func, target, True)
    sampled = [i for i in sch.trace.insts if i.kind.name == "SamplePerfectTile"]
    assert len(sampled) == 2                           # block columns per task, M tile


def _linear_module(weights, m=16):
    """main(x) = x @ W0 + b -> @ W1 ... as the ONNX importer emits linear layers."""
    k = weights[0].shape[0]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, m, k], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = x
            for w in weights:
                h = bb.emit(relax.op.matmul(h, relax.const(w)))
                h = bb.emit(relax.op.add(h, relax.const(np.full(w.shape[1], 0.5, np.float32))))
            out = bb.emit_output(h)
        bb.emit_func_output(out)
    return bb.get()


def _build_run(mod, target, x):
    from pipeline.build import build
    from pipeline.passes import apply_passes, graph_passes, split_passes
    from pipeline.runtime import CompiledModel

    _, late = split_passes(graph_passes(), "WinogradConv2D")
    built = build(apply_passes(mod, target, late), target)
    return CompiledModel(built.executable, list(built.params.values()))([x])[0], built


def test_pass_threshold_and_numerics(target):
    dense_w = np.random.default_rng(3).standard_normal((48, 64)).astype(np.float32)   # stays dense
    sparse_w = _sparse_weight(64, 40, 0.9, (1, 16), seed=4)                           # N % 16 != 0
    mod = _linear_module([dense_w, sparse_w])
    new, decisions = sparsify(mod, target, SparseSettings(mode="on", threshold=0.7))
    assert [d.sparse for d in decisions] == [False, True]
    assert "threshold" in decisions[0].reason
    assert decisions[1].block_sparsity == pytest.approx(block_sparsity(sparse_w, (1, 16)), abs=1e-3)
    kernels = [gv.name_hint for gv, f in new.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels == ["bsr_matmul_matmul_1"]
    x = np.random.default_rng(5).standard_normal((1, 16, 48)).astype(np.float32)
    got, built = _build_run(new, target, x)
    want = (x @ dense_w + 0.5) @ sparse_w + 0.5
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert "bsr_matmul" in built.default_scheduled.values()

    untouched, _ = sparsify(mod, target, SparseSettings(mode="on", threshold=0.95))
    assert untouched.same_as(mod)


def test_pass_auto_measures_each_layer(target):
    w = _sparse_weight(128, 128, 0.95, (1, 16))
    mod = _linear_module([w], m=32)
    _, (d,) = sparsify(mod, target, SparseSettings(mode="auto", repeats=2))
    assert d.sparse_ms > 0 and d.dense_ms > 0
    assert d.sparse == (d.sparse_ms < d.dense_ms) and "measured" in d.reason


def test_bad_block_is_a_user_error():
    from pipeline.errors import UserError

    assert parse_block("1x16") == (1, 16) and parse_block("auto") is None
    for bad in ("16", "0x4", "axb"):
        with pytest.raises(UserError):
            parse_block(bad)


def test_prune_then_run_sparse_auto(tmp_path):
    """`tune prune` a tiny BERT, then `tune run --sparse auto --trials 0`: decisions logged in the
    run folder and MLflow, the output verified against ONNX Runtime on the pruned model."""
    from mlflow.tracking import MlflowClient

    r = tune_cli(["prune", "bert-mini", "--sparsity", "0.9", "--block", "1x16", "--out",
                  "pruned.onnx", "--model-option", "hidden=64", "--model-option", "layers=1",
                  "--model-option", "seq=32"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = tune_cli(["models", "pruned.onnx"], tmp_path)
    assert r.returncode == 0 and "MatMul" in r.stdout, r.stderr[-2000:]
    r = tune_cli(["run", "--model", "pruned.onnx", "--sparse", "auto", "--trials", "0",
                  "--no-roofline", "--no-register", "--skip-untuned", "--repeats", "5",
                  "--measure-seconds", "1", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["verified"] and s["sparse"]["layers"] == 6
    table = json.loads((tmp_path / s["run_dir"] / "sparse.json").read_text())
    assert len(table["layers"]) == 6 and all(x["dense_ms"] for x in table["layers"])
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(s["mlflow_run_id"])
    assert run.data.params["sparse"] == "auto"
    assert run.data.metrics["sparse_layers"] + run.data.metrics["dense_layers"] == 6

    bad = tune_cli(["run", "--model", "pruned.onnx", "--sparse", "maybe", "--trials", "0"], tmp_path)
    assert bad.returncode != 0 and "--sparse" in bad.stderr
