import json

import pytest

from pipeline.errors import UserError
from pipeline.targets import HostInfo, load_presets, pick_auto, resolve_target


def host(arch="x86_64", flags=(), cuda=None, cores=4):
    return HostInfo(arch=arch, cpu_name="test cpu", features=frozenset(flags), physical_cores=cores,
                    logical_cores=cores * 2, cuda_arch=cuda, cuda_name="test gpu" if cuda else None)


AVX2 = ("sse4_2", "avx", "avx2", "fma")
AVX512 = AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512dq")


@pytest.mark.parametrize("flags,expected", [
    (AVX2, "x86-avx2"),
    (AVX512, "x86-avx512"),
    (AVX512 + ("avx512_vnni",), "x86-avx512-vnni"),
    (AVX512 + ("avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"), "x86-amx"),
])
def test_auto_picks_the_most_specific_x86_class(flags, expected):
    preset, why = pick_auto(host(flags=flags), load_presets())
    assert preset.name == expected
    assert "4 physical cores" in why


@pytest.mark.parametrize("flags,expected", [
    (("fp", "asimd"), "aarch64-neon"),
    (("fp", "asimd", "asimddp"), "aarch64-dotprod"),
    (("fp", "asimd", "asimddp", "i8mm", "sve"), "aarch64-i8mm"),
])
def test_auto_picks_arm_classes(flags, expected):
    assert pick_auto(host("aarch64", flags), load_presets())[0].name == expected


def test_cuda_device_wins_and_maps_to_nearest_lower_class():
    preset, why = pick_auto(host(flags=AVX2, cuda="sm_87"), load_presets())
    assert preset.name == "cuda-sm86" and "sm_87" in why
    assert pick_auto(host(flags=AVX2, cuda="sm_90"), load_presets())[0].name == "cuda-sm90"


def test_no_matching_preset_is_a_user_error():
    with pytest.raises(UserError, match="no preset"):
        pick_auto(host("riscv64", ()), load_presets())


def test_resolve_by_name_adds_cores_and_keeps_normalised_mcpu():
    r = resolve_target("x86-avx512", host(flags=AVX512, cores=6))
    assert r.preset == "x86-avx512"
    assert r.target_dict["mcpu"] == "skylake-avx512" and r.target_dict["num-cores"] == 6
    assert str(r.tvm_target().attrs["num-cores"]) == "6"


def test_raw_json_target():
    r = resolve_target('{"kind": "llvm", "mcpu": "znver4"}', host(flags=AVX512))
    assert r.preset.startswith("custom-llvm-") and r.target_dict["num-cores"] == 4
    assert r.tuning["trials_per_iter"] > 0


@pytest.mark.parametrize("spec,match", [
    ("not-a-preset", "unknown target"),
    ('{"kind": ', "not valid JSON"),
    ('{"mcpu": "x"}', "must be an object"),
    ('{"kind": "no-such-kind"}', "TVM rejects"),
])
def test_bad_targets(spec, match):
    with pytest.raises(UserError, match=match):
        resolve_target(spec, host(flags=AVX2))


def test_presets_are_valid_tvm_targets():
    import tvm

    for preset in load_presets().values():
        tvm.target.Target(preset.target, host=preset.host) if preset.host else tvm.target.Target(preset.target)
        assert set(preset.tuning) >= {"trials_per_iter", "layout"}, preset.name
        assert json.dumps(preset.target)
