import inspect
import subprocess
import sys

from pipeline import tvm_compat


def test_lazy_stack_matches_inspect_frames():
    def probe():
        return tvm_compat._lazy_stack(), inspect.stack()
    lazy, real = probe()
    assert [f.frame for f in lazy[:5]] == [f.frame for f in real[:5]]
    assert lazy[0].function == "probe" and lazy[0].lineno == real[0].lineno
    assert lazy[0].code_context[0].strip() == real[0].code_context[0].strip()


def test_patched_parser_still_parses_tvmscript_and_class_members():
    tvm_compat.apply()
    from tvm.script import ir as I
    from tvm.script import tirx as T

    @I.ir_module
    class Mod:
        @T.prim_func
        def add(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
            for i in range(4):
                b[i] = a[i] + T.float32(1)

    assert "add" in [gv.name_hint for gv in Mod.get_global_vars()]


def test_tensor_intrin_import_is_fast_after_patch():
    """Not a timing benchmark: it guards against the patch silently not applying (~60 s)."""
    code = ("import time; from pipeline import tvm_compat; tvm_compat.apply(); t = time.time(); "
            "import tvm.s_tir.tensor_intrin; print(time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 30
