import numpy as np

from pipeline.build import build
from pipeline.runtime import CompiledModel
from pipeline.tuning import SearchSettings, TuneBudget, tune


def test_build_uses_the_database_and_matches_untuned(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    plain = build(mod, target, None)
    assert plain.scheduled_tasks == 0 and plain.total_tasks >= 2
    tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=2),
         SearchSettings(trials_per_iter=1, population_size=16, init_min_unmeasured=4, runner_number=1,
                        runner_min_repeat_ms=0))
    tuned = build(mod, target, tmp_path / "db")
    assert tuned.scheduled_tasks == plain.total_tasks
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    a = CompiledModel(plain.executable, list(plain.params.values()))([x])[0]
    b = CompiledModel(tuned.executable, list(tuned.params.values()))([x])[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert list(plain.params) == list(tuned.params)
