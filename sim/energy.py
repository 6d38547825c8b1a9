"""Power of the engine on the U280 board: FPGA core-rail static + fabric dynamic (from the Yosys resource
counts and the engine's activity) + HBM energy per bit + everything else on the board.

Every coefficient is a ``Coefficient`` with its source, the figure quoted from it, how that figure was mapped
onto this model (``mapping``) and a status: ``cited`` (the number was read in the source text, named in
``source``) or ``unverified`` (no readable source gave it: a placeholder the estimate flags in its JSON and
report). docs/estimate.md, "Energy model", lists them.

The split is by supply rail so that no watt is counted twice: ``fpga_static_w`` and the fabric terms are
VCCINT (0.85 V core) power; ``board_overhead_w`` is everything a loaded, idle U280 draws from its 12 V inputs
that is *not* VCCINT (HBM and DDR4 at rest, the FPGA's auxiliary, HBM-I/O and transceiver rails, the
regulators' losses, the satellite controller); ``hbm_w`` adds the DRAM access energy of the traffic.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESOURCES_JSON = REPO / "benchmarks" / "results" / "resources.json"


@dataclass(frozen=True)
class Coefficient:
    value: float
    unit: str
    source: str
    status: str  # "cited" | "unverified"
    mapping: str = ""


# The three sources read for this table (docs/estimate.md, "Energy model", quotes each):
FGDRAM = ("M. O'Connor, N. Chatterjee, D. Lee, J. Wilson, A. Agrawal, S. W. Keckler, W. J. Dally, 'Fine-Grained "
          "DRAM: Energy-Efficient DRAM for Extreme Bandwidth Systems', MICRO-50, 2017 (doi 10.1145/3123939.3124545); "
          "read in the paper's text as archived in github 899ms/ai-infra-book, references/text/fgdram-micro17.txt "
          "(commit 023cf31)")
FSA_U280 = ("Vivado 2020.2 report_power of a routed xcu280-fsvh2892-2L-e build (a 16x16 FSA systolic array with an "
            "HBM port, 70 MHz core clock), summarised in the public note 'U280 Pre-Optimization Baseline (FSA 16x16, "
            "HBM)', 'Power Baseline' section (code-search index document 70766704971; the index does not name the "
            "repository)")
FLEXLLM_LOG = ("xbutil 'examine --report electrical' log of an Alveo U280 running FlexLLM (Llama-3.2-1B), github "
               "Crazy-James26/FlexLLM, SpinQuant_Llama_32_1B/run/u280_power_log.csv (commit c740cda), written by "
               "u280_power_logger.py beside it")

COEFFICIENTS: dict[str, Coefficient] = {
    "hbm_pj_per_bit": Coefficient(
        3.97, "pJ/bit read or written, DRAM side (activation + on-die data movement + interposer I/O)",
        f"{FGDRAM}, section 1: 'The energy to access a bit in HBM2 is approximately 3.97 pJ/bit'; section 2.1: "
        "2.24 pJ/bit data movement + 0.3 pJ/bit interposer I/O + 1.21 pJ/bit average activation = 3.92 pJ/bit "
        "including ECC", "cited",
        "the paper models a GPU's HBM2 (64-bit pseudo-channels at 1 GHz DDR, 16 GB/s each); the U280's are "
        "14.375 GB/s, taken as the same per-bit energy. DRAM side only: the FPGA's HBM controller and PHY are "
        "not in it (their rest power is inside board_overhead_w, their activity-dependent part is not modelled)"),
    "lut_uw_per_mhz": Coefficient(
        1e6 * (3.686 - 0.061 - 0.407 * 8 / 81.5) / 347_543 / 70, "uW/MHz per LUT at full engine activity: CLB logic "
        "+ signals (routing) + clocks of the hierarchy, its flip-flops included",
        f"{FSA_U280}: the FSA core 'dutDomain/fsa/fsa' draws 3.686 W with 347,543 LUT, 32,002 FF, 320 DSP and 8 "
        "BRAM at 70 MHz; the whole chip's 320 DSPs draw 0.061 W and its 81.5 BRAM36 0.407 W", "cited",
        "(3.686 W - 0.061 W of DSPs - 8/81.5 x 0.407 W of BRAM) / 347,543 LUT / 70 MHz = 0.147 uW/MHz; the "
        "source's activity is Vivado's vectorless default (no simulation activity named, confidence 'Medium'), "
        "taken as the engine's while it computes; its FF/LUT ratio is 0.09 against the engine's 0.22"),
    "ff_uw_per_mhz": Coefficient(
        0.01, "uW/MHz per flip-flop beyond those the LUT figure includes",
        "no figure for flip-flops alone found: the Vivado summary above gives CLB logic as one number; "
        "searched the code/issue/page corpora for UltraScale+ report_power tables with a Register row "
        "(found only 7-series ones)", "unverified",
        "kept as a placeholder; it is 0.4 W at full activity on the u280 engine"),
    "dsp_uw_per_mhz": Coefficient(
        1e6 * 0.061 / 320 / 70, "uW/MHz per DSP48E2 at full engine activity",
        f"{FSA_U280}: 'DSPs 0.061 W', 320 DSP48E2, all in the 70 MHz core", "cited",
        "0.061 W / 320 / 70 MHz = 2.72 uW/MHz; the source's DSPs are fp16 FMAs with no A/B/M/P pipeline "
        "registers at the vectorless default activity, the engine's are pipelined integer products "
        "(UG440: MREG lowers DSP power), so this likely over-states the engine's DSPs"),
    "bram_uw_per_mhz": Coefficient(
        1e6 * 0.407 / 81.5 / 250, "uW/MHz per RAMB36E2",
        f"{FSA_U280}: 'BRAM 0.407 W' for 81.5 BRAM36 (73.5 of them in SLR0 with the PCIe/XDMA and HBM logic)",
        "unverified",
        "the source does not say which clock those BRAMs run at: divided by an assumed 250 MHz (the design's "
        "XDMA AXI clock) = 20.0 uW/MHz; at 70 MHz it would be 71 uW/MHz. 0.07 W on the u280 engine either way "
        "within 0.2 W"),
    "uram_uw_per_mhz": Coefficient(
        1e6 * 0.407 / 81.5 / 250 / 8, "uW/MHz per URAM288 of the design (an average over a cascade, of which "
        "one block is enabled per access)",
        "no UltraScale+ figure for URAM288 power found (searched the docs, pages and code corpora for UG440/XPE "
        "URAM tables and report_power outputs with a URAM row: only utilization tables turned up); UG440 "
        "(2020.2, 'UltraRAM support for UltraScale+ Devices'): 'URAM blocks support cascading to create larger "
        "memory arrays while reducing the overall power by enabling only one URAM of a cascade at a time'; "
        "UG949 (2023.2, 'Mapping Memories to UltraRAM Blocks'): 'The current default threshold for UltraRAM "
        "column height is 8'", "unverified",
        "the RAMB36E2 placeholder above (20.0 uW/MHz per block, itself unverified) taken per enabled URAM288, "
        "one in each cascade of 8 (UG949's default height): 20.0 / 8 = 2.5 uW/MHz per URAM of the design, at "
        "full activity (the spad is read or written by every instruction)"),
    "fpga_static_w": Coefficient(
        0.850 * 1.679, "W, VCCINT (0.85 V core rail) static",
        f"{FSA_U280}: 'Vccint 0.850V: 8.591 A total (6.912 A dynamic + 1.679 A static)'; 'Device Static "
        "3.575 W' at a 33.8 C junction", "cited",
        "0.850 V x 1.679 A = 1.43 W; the other 2.15 W of the device static sit on the non-VCCINT rails, which "
        "board_overhead_w measures. Static power grows with junction temperature: a busier, hotter engine "
        "leaks more than at 33.8 C"),
    "board_overhead_w": Coefficient(
        37.342674 - 0.851 * 17.160, "W, all 12 V input power of a loaded, idle-between-requests U280 except "
        "its VCCINT output",
        f"{FLEXLLM_LOG}: the lowest reading, 2025-10-15 22:56:26: 'power_W' 37.342674 W (= 12 V PCIe "
        "12.169 V x 1.440 A + 12 V auxiliary 12.189 V x 1.626 A) with 'Internal FPGA Vcc' 0.851 V x 17.160 A",
        "cited",
        "37.343 W - 0.851 V x 17.160 A = 22.74 W (the five lowest readings of the log give 22.74-23.08 W; its "
        "readings span 37.3-59.8 W). A different design's idle, with its clocks running; it includes the VCCINT "
        "regulator's loss at that load, and the log records no 3.3 V current (xbutil's total leaves it out)"),
}


class EnergyError(ValueError):
    pass


def engine_resources(p, hw_name: str = "", path: Path = RESOURCES_JSON) -> dict:
    """Yosys counts of the engine for ``p`` from benchmarks/results/resources.json: the whole-engine count
    when it exists, else the fit over real 8- and 16-row engines at the same pe_lanes."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EnergyError(f"{path}: unreadable ({e}); run benchmarks/resources.py") from None
    for name, cfg in data.get("configs", {}).items():
        if cfg.get("pe_lanes") != p.pe_lanes:
            continue
        eng = cfg.get("engine") or {}
        if cfg.get("pe_rows") == p.pe_rows and eng.get("status", "ok") == "ok" and "lut" in eng:
            return {k: float(eng[k]) for k in ("lut", "ff", "dsp", "bram36")} | {
                "source": f"resources.json configs.{name}.engine (Yosys, whole engine)"}
        est = cfg.get("engine_rows_estimate") or {}
        fit = est.get("fit")
        if fit:
            return {k: fit[k]["fixed"] + fit[k]["per_row"] * p.pe_rows for k in ("lut", "ff", "dsp", "bram36")} | {
                "source": f"resources.json configs.{name}.engine_rows_estimate (fit over real 8/16-row "
                          f"engines, evaluated at pe_rows = {p.pe_rows})"}
    raise EnergyError(f"no Yosys count of an engine with pe_lanes = {p.pe_lanes} in {path}: run "
                      f"benchmarks/resources.py for this configuration")


RESULTS_DIR = REPO / "benchmarks" / "results"
RESOURCE_KEYS = ("lut", "ff", "dsp", "bram36", "uram")


def accelerator_resources(p, accel=None, hw_name: str = "", results: Path = RESULTS_DIR) -> dict:
    """Yosys counts of the whole accelerator (engine, units, controller, scratchpad, memory system) for
    engine ``p`` and accelerator ``accel``, from the ``benchmarks/accel_utilization.py`` result in
    ``results`` whose recorded ``engine`` and ``accelerator`` equal them field by field
    (``u280_utilization.json``, ``utilization-ci-small.json``, ...); the engine's share is kept apart
    (``engine_part``) because only the engine's activity is modelled. Without such a file: the engine
    alone (``engine_resources``), its ``source`` saying so."""
    from dataclasses import MISSING, fields

    def same(recorded, obj) -> bool:
        """Every field of ``obj`` equals the recorded one; a field the file predates must hold its
        default (the hardware it describes is then the same)."""
        if obj is None or not isinstance(recorded, dict):
            return False
        for fl in fields(obj):
            default = fl.default if fl.default is not MISSING else MISSING
            if recorded.get(fl.name, default) != getattr(obj, fl.name):
                return False
        return True

    for path in sorted(Path(results).glob("*utilization*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(d, dict) or "by_component" not in d or "accelerator" not in d:
            continue   # engine-only counts (u280_engine_utilization*.json) are not the whole accelerator
        if not (same(d.get("engine"), p) and same(d.get("accelerator"), accel)):
            continue
        eng = d["by_component"].get("engine", {})
        units = d["by_component"].get("special_functions", {})
        rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        return {k: float(d.get(k, 0)) for k in RESOURCE_KEYS} | {
            "engine_part": {k: float(eng.get(k, 0)) for k in RESOURCE_KEYS},
            "units_part": {k: float(units.get(k, 0)) for k in RESOURCE_KEYS},
            "source": f"{rel} (hw {d.get('hw')}: the whole accelerator counted by parts with Yosys, "
                      f"{d.get('date_utc', 'undated')}; its recorded engine and accelerator parameters equal "
                      f"this estimate's; made by `{d.get('command', 'benchmarks/accel_utilization.py')}`)"}
    res = engine_resources(p, hw_name)
    return res | {"uram": 0.0, "engine_part": {k: res.get(k, 0.0) for k in RESOURCE_KEYS},
                  "source": f"FALLBACK, the engine alone: no whole-accelerator count in "
                            f"{Path(results).relative_to(REPO) if Path(results).is_relative_to(REPO) else results} has this "
                            f"engine and accelerator (run `benchmarks/accel_utilization.py --hw "
                            f"{hw_name or 'HW'}`); {res['source']}"}


FABRIC_TERMS = (("lut", "lut_uw_per_mhz"), ("ff", "ff_uw_per_mhz"), ("dsp", "dsp_uw_per_mhz"),
                ("bram36", "bram_uw_per_mhz"), ("uram", "uram_uw_per_mhz"))
# which coefficient each component of the total rests on (the fabric rests on all four of FABRIC_TERMS)
PART_COEFFICIENT = {"fpga_static_w": "fpga_static_w", "hbm_w": "hbm_pj_per_bit",
                    "board_overhead_w": "board_overhead_w"}


def power(p, target, *, hw_name: str = "", resources: dict | None = None, hbm_bytes_per_s: float,
          engine_busy: float, units_busy: float = 1.0, coefficients: dict[str, Coefficient] | None = None,
          accel=None) -> dict:
    """Watts by component. Fabric power scales with activity: the engine's part of ``resources``
    (``engine_part``) with ``engine_busy`` (the fraction of the time an ENGINE instruction runs), the
    special-function units' (``units_part``) with ``units_busy`` (the fraction a unit runs), the rest
    (controller, scratchpad, memory system, glue) at full activity, an upper bound (they serve every
    instruction). ``resources``: counts (``accelerator_resources`` when None; without ``engine_part``
    all of them are the engine's). ``coefficients`` replaces the table (tests)."""
    table = COEFFICIENTS if coefficients is None else coefficients
    c = {k: v.value for k, v in table.items()}
    res = resources if resources is not None else accelerator_resources(p, accel, hw_name)
    f = target.clock_mhz
    act = max(0.0, min(1.0, engine_busy))
    u_act = max(0.0, min(1.0, units_busy))
    eng = res.get("engine_part") or {r: res.get(r, 0.0) for r, _ in FABRIC_TERMS}
    units = res.get("units_part") or {}
    rest = {r: max(0.0, res.get(r, 0.0) - eng.get(r, 0.0) - units.get(r, 0.0)) for r, _ in FABRIC_TERMS}
    by_res = {r: 1e-6 * f * (act * eng.get(r, 0.0) + u_act * units.get(r, 0.0) + rest[r]) * c[k]
              for r, k in FABRIC_TERMS}
    fabric = sum(by_res.values())
    hbm = hbm_bytes_per_s * 8 * c["hbm_pj_per_bit"] * 1e-12
    parts = {"fpga_static_w": c["fpga_static_w"], "fabric_dynamic_w": fabric, "hbm_w": hbm,
             "board_overhead_w": c["board_overhead_w"]}
    total = sum(parts.values())
    unverified = sorted(k for k, v in table.items() if v.status != "cited")
    unverified_w = (sum(parts[part] for part, k in PART_COEFFICIENT.items() if k in unverified)
                    + sum(by_res[r] for r, k in FABRIC_TERMS if k in unverified))
    basis = {part: f"{table[k].status}: {k} = {table[k].value:.4g} {table[k].unit.split(',')[0]}"
             for part, k in PART_COEFFICIENT.items()}
    basis["fabric_dynamic_w"] = "Yosys counts x " + ", ".join(
        f"{k} ({table[k].status}: {by_res[r]:.2f} W)" for r, k in FABRIC_TERMS)
    return {**parts, "total_w": total, "engine_busy": act,
            "fabric_by_resource_w": by_res,
            "resources": {k: v for k, v in res.items()},
            "activity": {"engine": act, "special_functions": u_act, "rest_of_accelerator": 1.0},
            "unverified_coefficients": unverified,
            "unverified_w": unverified_w,
            "unverified_share": unverified_w / total,
            "basis": basis,
            "coefficients": {k: asdict(v) for k, v in table.items()}}
