# amaranth: UnusedElaboratable=no
"""Reference <-> Amaranth simulation of the compute engine: every mode, random stalls, edge values,
and configurations the RTL cannot build refused with the parameter named."""

import dataclasses

import numpy as np
import pytest

from accllm.config import load_hw
from hw.engine import Engine, EngineConfigError
from hw.engine_parts import stages
from sim.engine_check import (MODES, check, full_size_check, hazard_check, make_case, make_cases,
                              per_row_requant_check, run_amaranth, simulate_engine)


@pytest.fixture(scope="module")
def params():
    return load_hw("ci-small").engine


@pytest.mark.parametrize("mode", MODES)
def test_mode_bit_exact_with_stalls(params, mode):
    cases = make_cases(params, 4, seed=11 + MODES.index(mode), modes=(mode,))
    actual, cycles = run_amaranth(params, cases, seed=5, stall_probability=0.3)
    bad, first = check(cases, actual)
    assert bad == 0, first
    assert cycles > 0


@pytest.mark.parametrize("edge", ["extreme", "min", "max", "pruned"])
def test_edge_values(params, edge):
    rng = np.random.default_rng(3)
    cases = [make_case(params, mode, rng, edge=edge, requant=(i % 2 == 0)) for i, mode in enumerate(MODES)]
    actual, _ = run_amaranth(params, cases, seed=1, stall_probability=0.2)
    bad, first = check(cases, actual)
    assert bad == 0, first


def test_fully_pruned_groups_are_zero(params):
    rng = np.random.default_rng(0)
    case = make_case(params, "dense_mv", rng, edge="pruned", k_beats=2, group_beats=1, requant=False)
    case.inputs["scales"][:] = 0
    # every group pruned: rebuild the expected output and the scale beats from scratch
    for key in ("s", "m"):
        case.beats["scale"][key][:] = 0
    case.expected = np.zeros_like(case.expected)
    actual, _ = run_amaranth(params, [case], seed=0, stall_probability=0.0)
    assert np.array_equal(actual[0], case.expected)


def test_mismatch_is_detected_and_named(params):
    cases = make_cases(params, 2, seed=4, modes=("dense_mv",))
    actual, _ = run_amaranth(params, cases, seed=0, stall_probability=0.0)
    actual[1] = actual[1].copy()
    actual[1][0, 0] += 1
    bad, first = check(cases, actual)
    assert bad == 1 and first["case"] == 1 and first["token"] == 0 and first["row"] == 0


def test_full_throughput_steady_state(params):
    """No stalls, long reduction: the array is busy nearly every cycle (one beat per cycle)."""
    rng = np.random.default_rng(1)
    kb = 32
    case = make_case(params, "dense_mv", rng, k_beats=kb, n=2 * params.pe_rows, group_beats=8, requant=False)
    actual, cycles = run_amaranth(params, [case], seed=0, stall_probability=0.0)
    assert np.array_equal(actual[0], case.expected)
    compute = 2 * kb  # two row tiles of kb beats
    load = kb  # activation words
    # the fill: the pipeline's registers (hw.engine_parts.stages; 3 before the 225 MHz pipeline, with
    # this bound at 12) and the output register
    st = stages(params)
    assert cycles <= load + compute + 9 + st.drain + st.out, cycles


def test_simulate_engine_reports(params, tmp_path):
    res = simulate_engine(params, "amaranth", 6, seed=2, build_dir=tmp_path)
    assert res["bit_exact"] and res["mismatches"] == 0 and res["cases"] == 6
    assert set(res["modes"]) == set(MODES)
    assert res["macs"] > 0 and res["cycles"] > 0
    assert res["macs_per_cycle"] == pytest.approx(res["macs"] / res["cycles"])


@pytest.mark.parametrize("change, param", [
    (dict(pe_lanes=7, max_reduction_len=4095 - 4095 % 7, max_keys=4095 - 4095 % 7), "pe_lanes"),
    (dict(max_reduction_len=4100), "max_reduction_len"),
    (dict(acc_bits=16), "acc_bits"),
    (dict(act_buffer_bytes=1000), "act_buffer_bytes"),
    (dict(multiplier_style="mul"), "multiplier_style"),
    (dict(multiplier_style="dsp", pe_lanes=2), "pe_lanes"),
])
def test_bad_config_refused_with_parameter(params, change, param):
    bad = dataclasses.replace(params, **change)
    with pytest.raises(EngineConfigError) as e:
        Engine(bad)
    assert e.value.param == param
    assert f"engine.{param}" in str(e.value)


def test_mismatch_dump_names_inputs(params, tmp_path):
    from sim.engine_check import dump_mismatch

    cases = make_cases(params, 1, seed=9, modes=("sparse_mv",))
    actual = [cases[0].expected.copy()]
    actual[0][0, -1] ^= 1
    bad, first = check(cases, actual)
    assert bad == 1 and first["row"] == cases[0].rows - 1
    path = dump_mismatch(tmp_path, cases, actual, first)
    z = np.load(path)
    assert {"expected", "actual", "input_a", "input_kept", "input_meta"} <= set(z.files)
    assert not np.array_equal(z["expected"], z["actual"])


def test_array_cell_every_pattern():
    """hw.engine.ArraySlice (the array exactly as Engine builds it): in 2:4 mode every row picks its own
    two activations of the group of four by its pattern and multiplies the 2-bit codes (the high bits
    of a code lane are ignored); otherwise each lane multiplies its own activation by the 4-bit code.
    Every pattern, extreme and random values."""
    from amaranth.sim import Simulator

    from hw.engine import ArraySlice
    from quant.formats import SPARSE_PATTERNS

    rows, pairs = 6, 2
    dut = ArraySlice(rows, pairs)
    rng = np.random.default_rng(0)
    bad = []

    async def tb(ctx):
        for it in range(120):
            sparse = it % 2
            q = rng.integers(-128, 128, (pairs, 4))
            dense = rng.integers(-128, 128, 2 * pairs)
            if it % 7 == 0:
                q[:] = rng.choice([-128, 127], q.shape)
                dense[:] = rng.choice([-128, 127], dense.shape)
            meta = rng.integers(0, 6, (rows, pairs))
            meta[:, 0] = np.arange(rows) % 6  # every pattern in every test vector
            codes = rng.integers(0, 16, (rows, 2 * pairs))
            for p in range(pairs):
                for i in range(4):
                    ctx.set(dut.q[p][i], int(q[p, i]))
            for lane in range(2 * pairs):
                ctx.set(dut.dense[lane], int(dense[lane]))
            ctx.set(dut.is_sparse, sparse)
            for r in range(rows):
                for p in range(pairs):
                    ctx.set(dut.meta[r][p], int(meta[r, p]))
                for lane in range(2 * pairs):
                    ctx.set(dut.codes[r][lane], int(codes[r, lane]))
            await ctx.delay(1e-9)
            for r in range(rows):
                for lane in range(2 * pairs):
                    p, j = divmod(lane, 2)
                    if sparse:
                        want = int(q[p, SPARSE_PATTERNS[meta[r, p]][j]]) * int(codes[r, lane] & 3)
                    else:
                        want = int(dense[lane]) * int(codes[r, lane])
                    got = ctx.get(dut.prods[r][lane])
                    if got != want and len(bad) < 5:
                        bad.append((it, sparse, r, lane, got, want))

    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()
    assert not bad, f"(iteration, sparse, row, lane, got, want) {bad}"


# ---------------------------------------------------------------------------------------------------
# Stall profiles, the directed hazard test, full-size reductions, the watchdog (issue 10)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["none", "input-only", "output-only", "asymmetric", "bursty", "weight-bursts"])
def test_stall_profiles_bit_exact(params, profile):
    from sim.engine_check import make_cases

    cases = make_cases(params, 6, seed=30 + len(profile))
    actual, _ = run_amaranth(params, cases, seed=3, stall_probability=0.5, stall_profile=profile)
    bad, first = check(cases, actual)
    assert bad == 0, first


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hazard_output_stalled_inputs_never(params, seed):
    """Bit-exact with the output stalled 80 % and the inputs never, and the run does reach the engine's
    internal stall (the audit found it asserted in 0 of 1,188 cycles of the uniform-stall tests)."""
    bad, first, cycles, stalled = hazard_check(params, seed)
    assert bad == 0, first
    assert stalled >= cycles // 4, f"internal stall asserted in only {stalled} of {cycles} cycles"


def test_full_size_reductions(params):
    """K = max_reduction_len (dense, 2:4), max_head_dim (QK), max_keys (PV) with the values that make
    the largest accumulators: |acc| reaches 4.6e8 in dense mode, past 2**28."""
    bad, first = full_size_check(params)
    assert bad == 0, first


def test_watchdog_turns_a_hang_into_a_failure(params):
    """An engine that loses an op (S1 not held on stall: sim/planted.py) stops producing output; the
    watchdog ends the run with the cycle and the stream named instead of hanging."""
    from sim import planted
    from sim.engine_check import EngineHang, hazard_cases

    cases = hazard_cases(params, 1)
    with pytest.raises(EngineHang) as e:
        run_amaranth(params, cases, seed=1, stall_probability=0.0, stall_profile="hazard",
                     watchdog_cycles=300, engine_factory=planted.load("no_hold_on_stall").Engine)
    h = e.value
    assert "out" in h.stopped and h.limit == 300
    assert 300 < h.cycle < 2000
    assert h.state["out"]["taken"] < h.state["out"]["total"]
    assert f"watchdog at cycle {h.cycle}" in str(h) and "out stopped" in str(h)


def test_unknown_stall_profile_is_refused(params, tmp_path):
    with pytest.raises(ValueError, match="stall profile 'burst': choose from uniform, none"):
        simulate_engine(params, "amaranth", 1, seed=0, build_dir=tmp_path, stall_profile="burst")


def test_per_row_requantization(params):
    bad, first = per_row_requant_check(params)
    assert bad == 0, first
