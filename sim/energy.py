"""Power of the engine on the U280 board: static + fabric dynamic (from the Yosys resource counts and the
engine's activity) + HBM energy per bit + board overhead.

Every coefficient is a ``Coefficient`` with its source and a status: ``cited`` (a published figure, named)
or ``unverified`` (no measured source was reachable from this machine; a placeholder of the right order
that the estimate flags in its JSON and report until someone replaces it with an XPE run or a board
reading). docs/estimate.md, "Energy model", lists them.
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


COEFFICIENTS: dict[str, Coefficient] = {
    "hbm_pj_per_bit": Coefficient(
        3.97, "pJ/bit", "O'Connor et al., 'Fine-Grained DRAM: Energy-Efficient DRAM for Extreme Bandwidth "
        "Systems', MICRO 2017: HBM2 access energy (activation + on-die movement + I/O), the baseline FGDRAM "
        "halves", "cited"),
    "lut_uw_per_mhz": Coefficient(
        0.07, "uW/MHz per LUT at XPE's default 12.5 % toggle rate (AMD UG440, Logic sheet), logic + routing",
        "order of magnitude of XPE for UltraScale+ at 0.85 V; not read from XPE here", "unverified"),
    "ff_uw_per_mhz": Coefficient(
        0.01, "uW/MHz per flip-flop at the 12.5 % toggle rate",
        "order of magnitude of XPE for UltraScale+; not read from XPE here", "unverified"),
    "dsp_uw_per_mhz": Coefficient(
        3.0, "uW/MHz per DSP48E2 at full activity",
        "order of magnitude of XPE for UltraScale+; not read from XPE here", "unverified"),
    "bram_uw_per_mhz": Coefficient(
        10.0, "uW/MHz per RAMB36E2 at 50 % enable",
        "order of magnitude of XPE for UltraScale+; not read from XPE here", "unverified"),
    "fpga_static_w": Coefficient(
        6.0, "W", "XCU280 device static at a warm junction; not read from XPE here", "unverified"),
    "board_overhead_w": Coefficient(
        15.0, "W", "U280 board: regulators, PCIe, DDR4 and HBM idle, shell; no idle-board reading found "
        "for a U280 (U280 readings of 39-58 W under unknown load: Paderborn PC2 wiki, 'Power Measurements'; "
        "a U50, the smaller HBM card, with only its shell loaded: 12.213 V x 1.363 A + 3.300 V x 0.223 A = "
        "17.4 W, its FPGA core 0.849 V x 4.100 A = 3.5 W: Xilinx/XRT pull request 5184)", "unverified"),
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


def power(p, target, *, hw_name: str = "", resources: dict | None = None, hbm_bytes_per_s: float,
          engine_busy: float) -> dict:
    """Watts by component. ``engine_busy``: fraction of the time the engine computes (the rest it waits
    on HBM); fabric dynamic power scales with it."""
    c = {k: v.value for k, v in COEFFICIENTS.items()}
    res = resources if resources is not None else engine_resources(p, hw_name)
    f = target.clock_mhz
    act = max(0.0, min(1.0, engine_busy))
    fabric = 1e-6 * f * act * (res["lut"] * c["lut_uw_per_mhz"] + res["ff"] * c["ff_uw_per_mhz"]
                               + res["dsp"] * c["dsp_uw_per_mhz"] + res["bram36"] * c["bram_uw_per_mhz"])
    hbm = hbm_bytes_per_s * 8 * c["hbm_pj_per_bit"] * 1e-12
    parts = {"fpga_static_w": c["fpga_static_w"], "fabric_dynamic_w": fabric, "hbm_w": hbm,
             "board_overhead_w": c["board_overhead_w"]}
    unverified = sorted(k for k, v in COEFFICIENTS.items() if v.status != "cited")
    unverified_w = (c["fpga_static_w"] + c["board_overhead_w"] + fabric)
    return {**parts, "total_w": sum(parts.values()), "engine_busy": act,
            "resources": {k: v for k, v in res.items()},
            "unverified_coefficients": unverified,
            "unverified_share": unverified_w / sum(parts.values()),
            "coefficients": {k: asdict(v) for k, v in COEFFICIENTS.items()}}
