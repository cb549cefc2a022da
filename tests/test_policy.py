"""The backend and thread policy (`metastate.api.choose_by_measurement`, `race`): the choice
logic under a fake clock, and the per-machine cache (hit, miss, another shape, a corrupt or
unwritable file). No real timing here: fake engines advance a fake clock by a set cost.
"""

import json

import numpy as np
import pytest
from test_generate import make_model

import metastate.api as api
from metastate.api import BackendUnavailable, choose_by_measurement, race
from metastate.cli import main
from metastate_core.config import ModelConfig
from metastate_core.params import param_shapes

CFG = ModelConfig(vocab_size=64, d_model=32, n_layer=2, head_size=16)
ARGS = ("model-dir", "auto", None, None, False)  # the loaders' (path, kernels, dtype, device, cuda_graphs)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeEngine:
    """Advances the clock by cost[threads] per decoded token; prefill is free."""

    def __init__(self, backend, cost, clock, threadable=True):
        self.backend, self.cost, self.clock, self.threadable = backend, cost, clock, threadable
        self.threads, self.runs = None, 0

    def set_threads(self, n):
        if n is not None and self.threadable:
            self.threads = n

    def prefill(self, ids, state=None, step=512):
        assert len(ids) > 1
        return None, "state"

    def step(self, token, state):
        self.runs += 1
        self.clock.now += self.cost[self.threads] if isinstance(self.cost, dict) else self.cost
        return None, state


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Fake loaders {backend: cost}; returns (costs, loaded engines, clock, cache file)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "thread_options", lambda: [1, 2])
    clock, costs, loaded = Clock(), {}, []

    def loader(backend):
        def load(*args):
            assert args == ARGS
            if isinstance(costs[backend], Exception):
                raise costs[backend]
            engine = FakeEngine(backend, costs[backend], clock, threadable=isinstance(costs[backend], dict))
            loaded.append(engine)
            return engine
        return load

    monkeypatch.setattr(api, "_LOADERS", {b: loader(b) for b in api.BACKENDS})
    return costs, loaded, clock, tmp_path / "cache" / "metastate" / "policy.json"


def choose(clock, cfg=CFG, backends=("torch", "numpy", "mlx"), threads="auto"):
    return choose_by_measurement(cfg, ARGS, list(backends), threads, timer=clock)


def test_race_keeps_the_median_and_drops_clear_losers():
    clock, runs = Clock(), {}

    def candidate(name, costs):
        costs = iter(costs)

        def run():
            runs[name] = runs.get(name, 0) + 1
            clock.now += next(costs)
        return (lambda: None), run

    times = race({"a": candidate("a", [1e-2] * 6), "b": candidate("b", [1.1e-2] * 6),
                  "slow": candidate("slow", [9e-2] * 6), "flaky": candidate("flaky", [5e-3, 5e-3] + [9e-2] * 4)},
                 timer=clock)
    assert min(times, key=times.get) == "a"
    assert times["b"] == pytest.approx(1.1e-2) and runs["a"] == runs["b"] == 6  # three rounds, warm-up + timed
    assert runs["slow"] == 1 and times["slow"] == pytest.approx(9e-2)  # its warm-up, 9x the fastest, ends it
    # fast once, slow as a rule: out in the second round, with the median of both
    assert times["flaky"] == pytest.approx((5e-3 + 9e-2) / 2) and runs["flaky"] == 3
    # a median over 1.5x the fastest leaves after the second round
    times = race({"a": candidate("a2", [1e-2] * 6), "c": candidate("c", [1.6e-2] * 6)}, timer=clock)
    assert runs["a2"] == 6 and runs["c"] == 4
    # another race's best already beats this one by far: one run
    race({"d": candidate("d", [1.0] * 6)}, timer=clock, bound=0.1)
    assert runs["d"] == 1


@pytest.mark.parametrize("seed", range(50))
def test_noisy_timings_never_choose_more_than_20_percent_slower(seed):
    rng, clock = np.random.default_rng(seed), Clock()
    true = {"a": 1.0, "b": 1.05, "c": 1.15, "d": 1.5, "e": 3.0}

    def run(name):
        # mostly within +-10 %, now and then a spike (another process took the core)
        clock.now += true[name] * (rng.uniform(0.9, 1.1) * (3 if rng.random() < 0.1 else 1))

    times = race({n: ((lambda: None), (lambda n=n: run(n))) for n in true}, timer=clock)
    assert true[min(times, key=times.get)] <= 1.2 * min(true.values())


def test_the_fastest_backend_and_thread_count_are_chosen_and_cached(fake, monkeypatch):
    costs, loaded, clock, cache = fake
    costs.update(torch={1: 0.010, 2: 0.020}, numpy={1: 0.008, 2: 0.009}, mlx=0.05)
    engine = choose(clock)
    assert (engine.backend, engine.threads) == ("numpy", 1)
    assert [e.backend for e in loaded] == ["torch", "numpy", "mlx"]
    turn = api.DECODED_IN_A_TURN  # decoded tokens in a timed turn
    assert loaded[2].runs == turn  # mlx: one turn, its warm-up, over 4.5x the best so far
    entry, = json.loads(cache.read_text()).values()
    assert entry["backend"] == "numpy" and entry["threads"] == 1
    assert entry["seconds"] == pytest.approx({"torch:1": 0.010 * turn, "torch:2": 0.020 * turn,
                                              "numpy:1": 0.008 * turn, "numpy:2": 0.009 * turn, "mlx": 0.05 * turn})
    # a hit: the cached choice is loaded at once, nothing is timed
    loaded.clear()
    engine = choose(clock)
    assert (engine.backend, engine.threads) == ("numpy", 1) and [e.backend for e in loaded] == ["numpy"]
    assert loaded[0].runs == 0
    # another shape, or another request, is a miss; both entries stay
    costs.update(torch={1: 0.010, 2: 0.004})
    assert (choose(clock, CFG.replace(d_model=64)).threads, choose(clock, threads=2).backend) == (2, "torch")
    assert len(json.loads(cache.read_text())) == 3
    assert choose(clock).backend == "numpy"  # the first entry still holds
    # changed engine code is measured anew (an editable install keeps its version number)
    monkeypatch.setattr(api, "engine_code_digest", lambda: "another")
    assert choose(clock).backend == "torch" and len(json.loads(cache.read_text())) == 4


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "null", '{"%s": {"backend": "cuda"}}',
                                     '{"%s": {"backend": "torch", "threads": 64}}', '{"%s": 3}'])
def test_a_corrupt_cache_is_ignored_and_replaced(fake, content):
    costs, loaded, clock, cache = fake
    costs.update(torch={1: 0.010, 2: 0.020}, numpy={1: 0.008, 2: 0.009}, mlx=0.05)
    cache.parent.mkdir(parents=True)
    key = api._policy_key(CFG, ARGS, ["torch", "numpy", "mlx"], "auto")
    cache.write_text(content.replace("%s", key.replace('"', '\\"')))
    assert choose(clock).backend == "numpy" and len(loaded) == 3
    assert json.loads(cache.read_text())[key]["backend"] == "numpy"


def test_an_unwritable_cache_never_fails(fake, monkeypatch, tmp_path):
    costs, loaded, clock, _ = fake
    costs.update(torch={1: 0.010, 2: 0.020}, numpy={1: 0.008, 2: 0.009}, mlx=0.05)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # its "directory" is a file
    assert choose(clock).backend == "numpy"
    assert choose(clock).backend == "numpy" and len(loaded) == 6  # measured again: nothing was kept


def test_backends_that_cannot_load_are_passed_over(fake):
    costs, loaded, clock, cache = fake
    costs.update(torch=BackendUnavailable("no torch"), numpy={1: 0.008, 2: 0.009}, mlx=0.05)
    assert choose(clock).backend == "numpy"
    costs.update(numpy=BackendUnavailable("no numpy either"), mlx=BackendUnavailable("nor mlx"))
    with pytest.raises(BackendUnavailable, match="no torch"):
        choose(clock, CFG.replace(n_layer=3))


def test_numpy_is_passed_over_where_its_float32_copy_would_not_fit(fake, monkeypatch):
    """A bfloat16 model's float32 copy for numpy (twice its size) beside the engine already held
    could exhaust memory, and the OOM killer ends a process without a word: the race leaves
    numpy out unloaded when it needs more than is available, and a cached choice of numpy that
    no longer fits is measured again. Alone, numpy is left to its loader's own check."""
    import weights.files

    costs, loaded, clock, _ = fake
    costs.update(torch={1: 0.010, 2: 0.020}, numpy={1: 0.001, 2: 0.001}, mlx=0.05)
    need = api.numpy_engine_bytes(CFG, None)
    assert need == (4 + 4) * sum(int(np.prod(s)) for s in param_shapes(CFG).values())  # float32 + stored
    free = {"now": need}
    monkeypatch.setattr(weights.files, "available_memory", lambda: free["now"])
    assert choose(clock).backend == "numpy"  # it fits: raced, and fastest; cached
    free["now"] = need - 1
    loaded.clear()
    engine = choose(clock)  # the cached numpy no longer fits: measured again without it
    assert engine.backend == "torch" and "numpy" not in [e.backend for e in loaded]
    assert choose(clock, backends=["numpy"], threads=1).backend == "numpy"


def test_the_numpy_loader_checks_memory_before_reading(tmp_path, monkeypatch, capsys):
    import weights.files

    path, cfg, _ = make_model(tmp_path)
    monkeypatch.setattr(weights.files, "memory_limit", lambda: api.numpy_engine_bytes(cfg, "float64") - 1)
    api.load(path, "numpy", threads=1)  # float32: half of it, fits
    with pytest.raises(api.MetaStateError, match="numpy backend's float weights needs about"):
        api.load(path, "numpy", dtype="float64", threads=1)
    rc = main(["logits", "--model", str(path), "--tokens", "1,2", "--out", str(tmp_path / "l.npy"),
               "--dtype", "float64"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error: the numpy backend's float weights")


def test_threads_given_and_nothing_to_choose(fake):
    costs, loaded, clock, cache = fake
    costs.update(torch={1: 0.010, 2: 0.020, 7: 0.001}, numpy={1: 0.008, 2: 0.009, 7: 0.1}, mlx=0.05)
    engine = choose(clock, threads=7)  # --threads 7: only that count is measured
    assert (engine.backend, engine.threads) == ("torch", 7)
    loaded.clear()
    engine = choose(clock, backends=["mlx"])  # one backend without a thread setting: no timing
    assert engine.backend == "mlx" and loaded[0].runs == 0
    engine = choose(clock, backends=["numpy"], threads=2)
    assert engine.threads == 2 and loaded[1].runs == 0
    assert len(json.loads(cache.read_text())) == 1


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert api.policy_cache_file() == tmp_path / "metastate" / "policy.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert api.policy_cache_file() == tmp_path / "home" / ".cache" / "metastate" / "policy.json"


@pytest.mark.parametrize("cpus, load, options", [(1, 0.0, [1]), (2, 0.3, [1, 2]), (2, 1.2, [1, 2]), (2, 1.9, [1]),
                                                  (2, 5.0, [1]), (16, 1.0, [1, 2, 4, 8, 16]), (16, 4.2, [1, 2, 4, 8, 13])])
def test_thread_options_leave_the_cpus_that_others_use(monkeypatch, cpus, load, options):
    monkeypatch.setattr(api, "cpu_count", lambda: cpus)
    monkeypatch.setattr(api.os, "getloadavg", lambda: (load, load, load))
    assert api.thread_options() == options


def test_load_measures_once_then_uses_the_cache(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    path, _, _ = make_model(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    try:
        engine, _ = api.load(path)
        assert engine.backend in api.BACKENDS
        entry, = json.loads((tmp_path / "cache" / "metastate" / "policy.json").read_text()).values()
        assert entry["backend"] == engine.backend and set(entry["seconds"]) >= {"torch:1", "mlx"}
        monkeypatch.setattr(api, "race", lambda *a, **k: pytest.fail("measured again"))
        again, _ = api.load(path)
        assert (again.backend, again.threads) == (engine.backend, engine.threads)
        engine, _ = api.load(path, "torch", threads=1)
        assert torch.get_num_threads() == 1 and engine.description.endswith("threads 1)")
    finally:
        torch.set_num_threads(before)


def test_threads_flag(capsys):
    for bad in ("0", "-2", "many"):
        assert main(["bench", "--size", "32,1,50", "--threads", bad]) == 2
        assert "--threads" in capsys.readouterr().err
    with pytest.raises(api.BackendError, match="threads"):
        api.load(None, "numpy", threads=0)


def test_no_backend_offers_the_kernels():
    with pytest.raises(api.BackendError, match="no installed backend offers kernels 'bogus'"):
        choose_by_measurement(CFG, ("model-dir", "bogus", None, None, False))


QUANTIZED = CFG.replace(extra={"quantization": {"group_size": 64, "bits": 4}})


def test_a_quantized_model_that_no_installed_backend_reads_names_the_mlx_extra(fake, monkeypatch):
    """numpy and torch read an MLX-quantized model dequantized to float32; where neither can
    (here: not enough memory for float32) and mlx is not installed, one line says what reads it
    as stored (exit 2, as every missing extra); with mlx installed but left out, which backend."""
    from metastate.api import BackendError
    from weights import WeightsError

    costs, loaded, clock, cache = fake
    costs.update(torch=WeightsError("dequantizing m to float32 needs about 9.0 GiB of memory"),
                 numpy=WeightsError("dequantizing m to float32 needs about 9.0 GiB of memory"))
    monkeypatch.setattr(api, "installed", lambda module: module != "mlx")
    with pytest.raises(BackendUnavailable) as e:
        choose(clock, QUANTIZED, backends=["torch", "numpy"])
    assert str(e.value) == ("dequantizing m to float32 needs about 9.0 GiB of memory; the mlx backend reads this 4-bit "
                            "MLX-quantized model as stored: pip install -e '.[mlx]'")
    assert e.value.exit_code == 2
    monkeypatch.setattr(api, "installed", lambda module: True)
    with pytest.raises(BackendError, match="reads this 4-bit MLX-quantized model as stored: choose it with --backend"):
        choose(clock, QUANTIZED, backends=["torch", "numpy"])
    # mlx among the candidates: it is chosen when it alone loads
    costs.update(mlx=0.05)
    assert choose(clock, QUANTIZED).backend == "mlx"
    # an ordinary model, or a scheme that no backend reads: the loaders' own error, unchanged
    for cfg in (CFG, CFG.replace(extra={"quantization": {"group_size": 64, "bits": 3}})):
        with pytest.raises(WeightsError) as e:
            choose(clock, cfg, backends=["torch", "numpy"])
        assert "mlx" not in str(e.value)


def test_auto_loads_every_installed_backend_for_a_quantized_model(fake):
    """The quantized case measures every backend as for any model (numpy and torch no longer
    refuse it): the fastest wins, and the cache keeps it apart from the float model's choice."""
    costs, loaded, clock, cache = fake
    costs.update(torch={1: 0.010, 2: 0.020}, numpy={1: 0.008, 2: 0.009}, mlx=0.004)
    assert choose(clock, QUANTIZED).backend == "mlx"
    assert [e.backend for e in loaded] == ["torch", "numpy", "mlx"]
    costs.update(mlx=0.05)
    assert choose(clock).backend == "numpy"  # the float model of the same shape: another entry
    assert len(json.loads(cache.read_text())) == 2
