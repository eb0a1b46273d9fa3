"""pipeline/profile.py: per-kernel time inside a built model, from the VM's instrument hook."""

from pipeline.build import build
from pipeline.profile import profile_kernels
from pipeline.runtime import CompiledModel
from pipeline.verify import seeded_inputs


def test_every_kernel_is_timed_with_its_call_count(tiny_mod):
    model, mod, target = tiny_mod
    built = build(mod, target)
    compiled = CompiledModel(built.executable, list(built.params.values()))
    feeds = seeded_inputs(model.inputs, 0)
    arrays = [feeds[s.name] for s in model.inputs]

    profile = profile_kernels(compiled, arrays, runs=3, warmup=1)

    kernels = [k for k in profile.kernels if not k.is_runtime]
    assert {k.name for k in kernels} <= set(built.costs), "every timed kernel is a compiled PrimFunc"
    assert len(kernels) >= 3 and all(k.calls >= 1 and k.ms > 0 for k in kernels)
    assert [k.ms for k in profile.kernels] == sorted((k.ms for k in profile.kernels), reverse=True)
    assert any(k.is_runtime for k in profile.kernels)          # VM builtins are listed, but marked
    # the hook is removed afterwards: a plain call still works and returns the same result
    assert compiled(arrays)[0].shape == tuple(model.outputs[0].shape)
