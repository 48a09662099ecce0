"""`model.backend: auto` decided by measurement: made, cached, reused, measured again for a new key,
never overriding an explicit backend; and the hardware facts and build flags it keys on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_config

from charlm import hardware
from charlm.config import ModelConfig
from charlm.errors import UserError
from charlm.models import autotune, timing
from charlm.models.autotune import Workload, choose
from charlm.models.native import build_flags

CPU = torch.device("cpu")
TINY = ModelConfig(type="lstm", hidden_size=16, num_layers=1, embedding_dim=8)


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """auto measures (conftest pins it for the rest of the suite), into a cache of this test's own."""
    monkeypatch.setenv("CHARLM_AUTO", "measure")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / autotune.CACHE_NAME


@pytest.mark.slow
def test_measured_choice_is_made_cached_and_reused(measuring):
    rng = torch.get_rng_state()
    first = choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16))
    assert torch.equal(torch.get_rng_state(), rng)  # the run's seeded draws are not disturbed
    assert first.measured and set(first.seconds) == {"native", "fused"}
    assert first.backend == autotune.pick(first.seconds, "native")
    assert "measured in" in first.describe() and first.describe().startswith(f"backend auto -> {first.backend} (")
    entries = json.loads(measuring.read_text())
    ((key, entry),) = entries.items()
    assert entry["backend"] == first.backend and entry["took_s"] < 3.0
    assert json.loads(key)["mode"] == "train" and json.loads(key)["cpu"] == hardware.cpu_model()

    again = choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16))
    assert not again.measured and again.backend == first.backend and "from cache" in again.how

    other = choose("auto", TINY, 30, CPU, "fp32", Workload.training(8, 16))  # another shape: another key
    assert other.measured and len(json.loads(measuring.read_text())) == 2
    inference = choose("auto", TINY, 30, CPU, "fp32", Workload.generation(2))
    assert inference.measured and len(json.loads(measuring.read_text())) == 3


def test_the_fastest_measured_backend_is_picked(measuring, monkeypatch):
    for figures, winner in (({"native": 0.2, "fused": 0.1}, "fused"), ({"native": 0.1, "fused": 0.3}, "native")):
        monkeypatch.setattr(autotune, "measure", lambda *args, figures=figures, **kw: dict(figures))
        picked = choose("auto", TINY, 30, CPU, "bf16", Workload.training(4, 16 + len(winner)))
        assert picked.backend == winner and picked.measured
        slower = max(figures, key=figures.get)
        assert f"{figures[slower] / figures[winner]:.2f}x {slower}" in picked.how


def test_a_near_tie_keeps_native(measuring, monkeypatch):
    """Within TIE (3%) native stays: 2 s of timing cannot tell such backends apart."""
    assert autotune.pick({"native": 0.102, "fused": 0.1}, "native") == "native"
    assert autotune.pick({"native": 0.106, "fused": 0.1}, "native") == "fused"
    assert autotune.pick({"native": 0.1, "fused": 0.102}, "fused") == "fused"
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: {"native": 0.102, "fused": 0.1})
    picked = choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16))  # fixed table: fused here
    assert picked.backend == "native" and "0.98x fused, a tie" in picked.how


def test_a_changed_machine_key_measures_again(measuring, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: calls.append(1) or {"native": 0.1, "fused": 0.2})
    choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16))
    choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16))
    assert len(calls) == 1
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Another CPU (family 6, model 207)")
    choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16))
    assert len(calls) == 2


class SimulatedMachine:
    """A clock that advances only by the calls it times: each backend's call costs its own seconds,
    times `burst` for a call that starts while a neighbour is busy (`busy`, a time window)."""

    def __init__(self, cost: dict[str, float], burst: float = 1.0, busy: tuple[float, float] = (0.0, 0.0)):
        self.now, self.cost, self.burst, self.busy = 0.0, cost, burst, busy
        self.order: list[str] = []

    def clock(self) -> float:
        return self.now

    def runs(self) -> dict:
        def call(name):
            def run():
                slow = self.burst if self.busy[0] <= self.now < self.busy[1] else 1.0
                self.order.append(name)
                self.now += self.cost[name] * slow

            return run

        return {name: call(name) for name in self.cost}


def blocks_of(order: list[str]) -> list[str]:
    return [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]


def test_timing_runs_in_blocks_a_b_b_a_and_stops_early_on_a_clear_lead():
    machine = SimulatedMachine({"native": 0.05, "fused": 0.1})
    seconds = timing.time_in_blocks(machine.runs(), budget=2.7, clock=machine.clock)
    assert seconds == pytest.approx({"native": 0.05, "fused": 0.1})
    # warm-up blocks A B B A, then round A B, round B A: 2x is decisive after two rounds
    assert blocks_of(machine.order) == ["native", "fused", "native", "fused", "native"]
    assert machine.now < 2.0


def test_a_near_tie_gets_every_round_the_budget_allows_and_keeps_within_it():
    machine = SimulatedMachine({"native": 0.1, "fused": 0.097})
    seconds = timing.time_in_blocks(machine.runs(), budget=2.7, clock=machine.clock)
    assert seconds["fused"] < seconds["native"]
    assert len(blocks_of(machine.order)) >= 8
    assert machine.now <= 2.7


def test_a_burst_of_noise_spoils_one_block_not_the_answer():
    # 3x slower calls for 0.1 s after the warm-up: one timed block is spoilt
    machine = SimulatedMachine({"native": 0.09, "fused": 0.1}, burst=3.0, busy=(0.9, 1.0))
    seconds = timing.time_in_blocks(machine.runs(), budget=2.7, clock=machine.clock)
    assert seconds == pytest.approx({"native": 0.09, "fused": 0.1})
    assert autotune.pick(seconds, "native") == "native"


def test_a_call_longer_than_the_budget_still_times_each_backend_once():
    machine = SimulatedMachine({"native": 1.5, "fused": 1.2})
    seconds = timing.time_in_blocks(machine.runs(), budget=2.7, clock=machine.clock)
    assert seconds == pytest.approx({"native": 1.5, "fused": 1.2})
    assert machine.order == ["native", "fused", "fused", "native", "native", "fused"]


def test_explicit_backend_and_fixed_mode_never_measure(measuring, monkeypatch):
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    for backend in ("native", "fused", "reference"):
        assert choose(backend, TINY, 30, CPU, "fp32", Workload.training(4, 16)).backend == backend
    mingru = ModelConfig(type="mingru", hidden_size=16, num_layers=1, embedding_dim=8)
    assert choose("auto", mingru, 30, CPU, "fp32", Workload.training(4, 16)).backend == "native"
    assert choose("auto", TINY, 30, torch.device("cuda"), "fp32", Workload.training(4, 16)).backend == "fused"
    assert choose("auto", TINY, 30, CPU, "fp32", None).how == "fixed table"  # no workload: info, export
    monkeypatch.setenv("CHARLM_AUTO", "fixed")
    assert choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16)).backend == "fused"
    assert not measuring.exists()
    monkeypatch.setenv("CHARLM_AUTO", "sometimes")
    with pytest.raises(UserError, match="CHARLM_AUTO"):
        choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16))


@pytest.mark.slow
def test_train_says_the_measured_choice_then_reuses_it(tmp_path, monkeypatch, text_file):
    monkeypatch.setenv("CHARLM_AUTO", "measure")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    from charlm.config import config_yaml

    config.write_text(config_yaml(tiny_config(text_file, train={"threads": 1})), encoding="utf-8")
    first = run_cli("train", "--config", str(config), "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    line = next(text for text in first.stdout.splitlines() if text.startswith("backend auto -> "))
    assert "measured in" in line and "cached" in line
    assert ", 1 thread)" in first.stdout  # train.threads
    second = run_cli("train", "--config", str(config), "--out", str(tmp_path / "b"))
    assert "from cache" in next(text for text in second.stdout.splitlines() if text.startswith("backend auto -> "))
    explicit = run_cli("train", "--config", str(config), "--out", str(tmp_path / "c"), "--set", "model.backend=native")
    assert "backend auto" not in explicit.stdout and "(backend native)" in explicit.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "variable,value,fragment", [("CHARLM_AUTO", "maybe", "CHARLM_AUTO"), ("CHARLM_MAX_ISA", "sse9", "CHARLM_MAX_ISA")]
)
def test_unknown_setting_is_one_line(tmp_path, monkeypatch, text_file, variable, value, fragment):
    from charlm.config import config_yaml

    monkeypatch.setenv(variable, value)
    config = tmp_path / "tiny.yaml"
    config.write_text(config_yaml(tiny_config(text_file)), encoding="utf-8")
    result = run_cli("train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr


# --- the hardware facts and the build flags ------------------------------------------------------

SAPPHIRE = frozenset("avx2 fma avx512f avx512bw avx512dq avx512vl avx512_bf16 amx_bf16 amx_tile".split())


def test_isa_levels_from_flags_and_caps(monkeypatch):
    assert hardware.cpu_isa_level(SAPPHIRE) == "amx"
    assert hardware.cpu_isa_level(SAPPHIRE - {"amx_tile"}) == "avx512_bf16"
    assert hardware.cpu_isa_level(SAPPHIRE - {"avx512_bf16"}) == "avx512"  # AMX without the level below it
    assert hardware.cpu_isa_level(frozenset({"avx2", "fma", "avx"})) == "avx2"
    assert hardware.cpu_isa_level(frozenset({"sse4_2"})) is None
    assert hardware.capped("amx", "avx2") == "avx2" and hardware.capped("avx2", "amx") == "avx2"
    assert hardware.capped(None, "avx2") is None
    monkeypatch.setenv("CHARLM_MAX_ISA", "avx512")
    assert hardware.isa_cap() == "avx512" and not hardware.bf16_units_allowed()
    monkeypatch.setenv("CHARLM_MAX_ISA", "AVX2")
    assert hardware.isa_cap() == "avx2"
    assert hardware.physical_cores() >= 1 and hardware.cpu_model()


def test_build_flags_per_platform(monkeypatch):
    monkeypatch.delenv("CHARLM_MAX_ISA", raising=False)
    cflags, ldflags = build_flags("Darwin", "arm64", "")
    assert not any(f.startswith(("-march", "-mprefer", "-mno")) for f in cflags)
    assert "-fopenmp" not in cflags + ldflags and "-lmvec" not in ldflags
    cflags, ldflags = build_flags("Linux", "aarch64", "glibc")
    assert "-march=native" not in cflags and "-fopenmp" in cflags and "-lmvec" in ldflags
    assert "-lmvec" not in build_flags("Linux", "x86_64", "musl", "avx2")[1]
    cflags, _ = build_flags("Linux", "x86_64", "glibc", "avx512_bf16")
    assert "-march=native" in cflags and "-mprefer-vector-width=512" in cflags
    monkeypatch.setenv("CHARLM_MAX_ISA", "avx2")
    cflags, _ = build_flags("Linux", "x86_64", "glibc", "avx2")
    assert "-mno-avx512f" in cflags and "-mprefer-vector-width=256" in cflags
    monkeypatch.setenv("CHARLM_MAX_ISA", "avx512")
    assert "-mno-avx512bf16" in build_flags("Linux", "x86_64", "glibc", "avx512")[0]


def test_mps_runs_bf16_configs_in_fp32_and_is_auto_where_available(monkeypatch):
    from charlm.training import runtime

    precision, notice = runtime.usable_precision(torch.device("mps"), "bf16")
    assert precision == "fp32" and "running in fp32" in notice
    runtime.check_precision(torch.device("mps"), "bf16")  # no error: the notice above says what runs
    monkeypatch.setattr(runtime, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto").type == "mps" and runtime.resolve_device("mps").type == "mps"
    monkeypatch.setattr(runtime, "mps_available", lambda: False)
    assert runtime.resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="MPS is not available"):
        runtime.resolve_device("mps")


def test_isa_cap_below_bf16_runs_bf16_as_fp32(monkeypatch):
    from charlm.training import runtime

    monkeypatch.setenv("CHARLM_MAX_ISA", "avx512")
    precision, notice = runtime.usable_precision(CPU, "bf16")
    assert precision == "fp32" and "no bf16 units" in notice


@pytest.mark.slow
def test_doctor_reports_the_machine_and_auto_choices():
    done = run_cli("doctor", "--json")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["cpu"] == hardware.cpu_model() and facts["physical_cores"] >= 1 and facts["threads"] >= 1
    assert facts["torch"] == torch.__version__ and isinstance(facts["cpp_loops"], bool)
    assert {(row["cell"], row["precision"]) for row in facts["auto"]} == {
        (cell, precision) for cell in ("rnn", "lstm", "gru", "mingru") for precision in ("fp32", "bf16")
    }
    assert all(row["backend"] in ("native", "fused") for row in facts["auto"])
    screen = run_cli("doctor", "--threads", "1")
    assert screen.returncode == 0 and "ISA levels" in screen.stdout and "; 1 thread" in screen.stdout
    assert "model.backend: auto" in screen.stdout


def test_a_damaged_or_unwritable_cache_only_costs_a_measurement(measuring, monkeypatch):
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: {"native": 0.1, "fused": 0.2})
    measuring.parent.mkdir(parents=True)
    measuring.write_text("{not json")
    assert choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16)).measured
    key = next(iter(json.loads(measuring.read_text())))
    measuring.write_text(json.dumps({key: {"backend": "native", "seconds": "garbage"}}))
    assert choose("auto", TINY, 30, CPU, "fp32", Workload.training(4, 16)).measured

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(autotune, "write_text_atomic", read_only)
    picked = choose("auto", TINY, 30, CPU, "fp32", Workload.training(9, 16))
    assert picked.backend == "native" and "not cached: Permission denied" in picked.how
