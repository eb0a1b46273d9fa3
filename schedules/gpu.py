"""CUDA tuning space: MetaSchedule's GPU rules with tensor cores (wmma, 16x16x16 fragments) first,
on architectures that have them (sm_70 and later). Untuned CUDA kernels keep DLight's schedules.

The tensor-core tiles stage operands and results through static `shared` memory. MetaSchedule's own
`cuda-tensorcore` defaults use `shared.dyn`, and TVM 0.27 cannot lower those here: the merged
dynamic buffer takes one dtype (float16) and the float32 result store through `tvm_access_ptr`
fails its element-type check. The static variant has a related problem: StorageRewrite reuses the
dead float16 operand tile for the float32 result tile, with the same failure. So a module that
uses tensor cores is compiled without StorageRewrite (`build_config`); the tiles are small (a few
KB each) and checked against the shared-memory limit by MetaSchedule's VerifyGPUCode postprocessor.
"""

from __future__ import annotations

TENSOR_CORE_MIN_SM = 70
# (operand dtype, accumulator dtype) pairs the wmma intrinsics cover, each with B plain and transposed
WMMA_DTYPES = (("float16", "float32"), ("float16", "float16"), ("int8", "int32"))
_TENSOR_CORE_CALLS = ("tvm_mma_sync", "tvm_load_matrix_sync", "tvm_store_matrix_sync")


def sm_version(target) -> int:
    """70 for sm_70, 90 for sm_90a; 0 for a target that is not CUDA."""
    if target.kind.name != "cuda":
        return 0
    arch = str(target.attrs.get("arch", ""))
    digits = "".join(c for c in arch.removeprefix("sm_") if c.isdigit())
    return int(digits) if digits else 0


def has_tensor_cores(target) -> bool:
    return sm_version(target) >= TENSOR_CORE_MIN_SM


def tensor_core_rules() -> list:
    """MultiLevelTilingTensorCore over the wmma groups, then MetaSchedule's CUDA rules for the
    tasks it does not match (fp32, reductions, elementwise)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    rule = ms.schedule_rule
    groups = [get_wmma_intrin_group("shared", "shared", a, c, trans_b)
              for a, c in WMMA_DTYPES for trans_b in (False, True)]
    tensor_core = rule.MultiLevelTilingTensorCore(
        intrin_groups=groups, structure="SSSRRSRS",
        tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"], max_innermost_factor=4,
        vector_load_lens=[1, 2, 3, 4, 8, 16],
        reuse_read=rule.ReuseType(req="must", levels=[4], scope="shared"),
        reuse_write=rule.ReuseType(req="must", levels=[2], scope="shared"),
        use_software_pipeline=False)
    return [tensor_core, *rule.ScheduleRule.create("cuda")]


def tuning_space(target):
    """The space generator for a CUDA task without a rule of ours: tensor cores where the
    architecture has them, else MetaSchedule's default CUDA space."""
    from tvm.s_tir import meta_schedule as ms

    if not has_tensor_cores(target):
        return "post-order-apply"
    return ms.space_generator.PostOrderApply(sch_rules=tensor_core_rules(), postprocs="cuda-tensorcore",
                                             mutator_probs="cuda-tensorcore")


def uses_tensor_cores(mod) -> bool:
    """Whether a scheduled module calls the wmma builtins (a tensor-core record was applied). Read
    from the printed TIR: 0.27 has no Python visitor for TIR expressions, and only CUDA modules
    (few, small kernels) are asked."""
    import tvm

    return any(isinstance(f, tvm.tirx.PrimFunc) and any(c in f.script() for c in _TENSOR_CORE_CALLS)
               for _, f in mod.functions_items())


def build_config(mod) -> dict:
    """PassContext settings a module needs to compile (see the module docstring)."""
    return {"tirx.disable_storage_rewrite": True} if uses_tensor_cores(mod) else {}
