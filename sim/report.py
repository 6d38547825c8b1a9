"""`accllm report`: one self-contained HTML file (matplotlib figures embedded as base64 PNG) around one
design point of ``sim.estimate``: the roofline, tokens/s and tokens/J against context with and without Λ,
bytes per token by component, dense against 2:4 (with the held-out perplexity of each from
benchmarks/results/quality.json), and the table against AccLLM and FlightLLM (../shared/ANCHORS.md).
Written to a temporary name and moved into place when complete."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from pathlib import Path

from quant.atomic import write_json, write_text

from .estimate import LATENCY_SWEEP, SCOPE, ArtifactFormat, EstimateError, estimate
from .hbm import SHUHAI_SEQUENTIAL_GBPS

REPO = Path(__file__).resolve().parent.parent
QUALITY_JSON = REPO / "benchmarks" / "results" / "quality.json"
#: ../shared/ANCHORS.md: AccLLM (arXiv 2505.03745, simulated) and FlightLLM (FPGA 2024, measured on a U280)
PEERS = [
    {"design": "AccLLM (paper, simulated)", "model": "Llama-2-7B, 2:4, W2A8KV4", "clock_mhz": 225,
     "decode_tokens_per_s": 164.0, "power_w": 33.0, "tokens_per_j": 4.96},
    {"design": "FlightLLM (paper, U280 board)", "model": "Llama-2-7B, N:M, ~3.5-bit W, A8", "clock_mhz": 225,
     "decode_tokens_per_s": 55.0, "power_w": 45.0, "tokens_per_j": 55.0 / 45.0},
]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _recipe(name_or_yaml: str):
    """A recipe by name or YAML path, for callers without accllm.config (sim must not import accllm): the CLI
    passes ``accllm.config.load_recipe`` instead, which validates every field."""
    import yaml

    from quant.recipe import MODIFIERS, Recipe

    p = Path(name_or_yaml)
    if not (p.suffix in (".yaml", ".yml") or p.exists()):
        p = REPO / "configs" / "recipes" / f"{name_or_yaml}.yaml"
    if not p.is_file():
        raise EstimateError(f"recipe {name_or_yaml!r}: no such built-in recipe or file")
    data = (yaml.safe_load(p.read_text()) or {}).get("recipe", {})
    mods = []
    for m in data.get("modifiers", []):
        (k, v), = m.items()
        mods.append(MODIFIERS[k](**(v or {})))
    return Recipe(name=data.get("name", p.stem), modifiers=mods)


def _quality() -> dict[str, float]:
    """recipe -> held-out perplexity of SmolLM2-135M (512-token windows, Λ 4 + 508) from quality.json."""
    try:
        rows = json.loads(QUALITY_JSON.read_text())["rows"]
    except (OSError, json.JSONDecodeError, KeyError):
        return {}
    out = {"float": None}
    for r in rows:
        if r.get("seq_len") == 512 and r.get("recipe"):
            out.setdefault(r["recipe"], r["perplexity"])
        if r.get("row") == "float":
            out["float"] = r["perplexity"]
    return out


def sweep(p, target, m, fmt, contexts, batch, hw_name, accel=None) -> list[dict]:
    out = []
    for c in contexts:
        try:
            r = estimate(p, target, m, fmt, c, batch, hw_name=hw_name, accel=accel, prefill=False)
        except EstimateError:
            continue
        out.append({"context": c, "decode": r["decode_tokens_per_s"], "tpj": r["tokens_per_j"],
                    "roofline": r["hbm_roofline_tokens_per_s"], "bytes": r["hbm_bytes_per_token"]})
    return out


def build(p, target, m, recipe_arg: str, context: int, batch: int, hw_name: str, hw_arg: str,
          model_arg: str, load_recipe=None, accel=None) -> tuple[str, dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_recipe = load_recipe or _recipe
    fmt = ArtifactFormat.from_recipe(load_recipe(recipe_arg))
    main = estimate(p, target, m, fmt, context, batch, hw_name=hw_name, accel=accel)
    # the memory latency is not a measured figure (sim.estimate.MEM_LATENCY_CYCLES): decode beside it
    lat = {main["memory"]["latency_cycles"]: main["decode_tokens_per_s"]}
    for L in LATENCY_SWEEP:
        if L in lat:
            continue
        lat[L] = estimate(p, target, m, fmt, context, batch, hw_name=hw_name, accel=accel, latency=L,
                          prefill=False)["decode_tokens_per_s"]
    main["decode"]["tokens_per_s_by_latency"] = {str(k): lat[k] for k in sorted(lat)}
    cmd = (f"accllm report --hw {hw_arg} --model {model_arg} --recipe {recipe_arg} --context {context}"
           + (f" --batch {batch}" if batch != 1 else ""))
    est_cmd = cmd.replace("accllm report", "accllm estimate") + " --json"
    figs = []

    # 1. roofline: GMAC/s against MACs per HBM byte
    f_hz = target.clock_mhz * 1e6
    peak = p.macs_per_cycle * f_hz / 1e9
    bw = main["hbm"]["theoretical_gbps"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    import numpy as np

    x = np.logspace(-1, 3, 200)
    ax.loglog(x, np.minimum(peak, bw * x), "k-", label=f"engine peak {peak:.0f} GMAC/s, HBM {bw:.0f} GB/s")
    ax.loglog(x, np.minimum(peak, SHUHAI_SEQUENTIAL_GBPS * x), "k--", lw=0.8,
              label=f"HBM measured {SHUHAI_SEQUENTIAL_GBPS:.0f} GB/s (Shuhai)")
    pts = {}
    for name, rec in (("dense", "w2a8kv4"), ("2:4", "w2a8kv4-sparse24")):
        try:
            fr = ArtifactFormat.from_recipe(load_recipe(rec))
            r = main if fr == fmt else estimate(p, target, m, fr, context, batch, hw_name=hw_name, accel=accel)
        except EstimateError:
            continue
        pts[name] = r
        macs = r["decode"]["macs_per_token"]
        ai = macs / r["hbm_bytes_per_token"]
        ax.plot([ai], [macs * r["decode_tokens_per_s"] / 1e9], "o", label=f"decode, {name} ({rec})")
    ax.set_xlabel("MACs per HBM byte")
    ax.set_ylabel("GMAC/s")
    ax.set_title(f"Roofline: {m.name} on {hw_name}, context {context}")
    ax.legend(fontsize=7)
    figs.append(("Roofline with the design point", _png(fig), cmd,
                 "Decode does about one MAC per weight and reads each weight once per token: far left of the "
                 "ridge point. The design points lie far below the HBM roof: the compiled program streams its "
                 f"weights through {main['accelerator']['weight_lanes']} HBM AXI port(s) at once and everything else through one "
                 "(14.4 GB/s each, not 460), and its special functions and memory instructions run one at a "
                 "time beside the engine's streams."))

    # 2. tokens/s and tokens/J against context, with and without Λ
    ctxs = [128, 512, 2048, 4096, 16384]  # each a compiled decode step (about 10 s each for a 7B)
    no_lambda = dataclasses.replace(fmt, window=None, sinks=0)
    with_lambda = fmt if fmt.window is not None else dataclasses.replace(fmt, sinks=4, window=508)
    s_l = sweep(p, target, m, with_lambda, ctxs, batch, hw_name, accel)
    s_n = sweep(p, target, m, no_lambda, ctxs, batch, hw_name, accel)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for s, lab, st in ((s_l, f"Λ {with_lambda.sinks} + {with_lambda.window}", "o-"), (s_n, "full attention", "s--")):
        a1.semilogx([r["context"] for r in s], [r["decode"] for r in s], st, label=lab)
        a2.semilogx([r["context"] for r in s], [r["tpj"] for r in s], st, label=lab)
    a1.set_xlabel("context (tokens)"), a1.set_ylabel("decode token/s"), a1.legend(fontsize=8)
    a2.set_xlabel("context (tokens)"), a2.set_ylabel("token/J"), a2.legend(fontsize=8)
    a1.set_title("decode throughput"), a2.set_title("energy efficiency (see the power caveat)")
    figs.append(("Tokens/s and tokens/J against context, with and without Λ", _png(fig), cmd,
                 f"Without Λ the KV cache read grows with the context and the engine refuses contexts beyond "
                 f"engine.max_keys = {p.max_keys} or the model's max_position_embeddings = {m.max_positions}; "
                 f"with Λ the cache stops at {with_lambda.sinks + with_lambda.window} tokens."))

    # 3. bytes per token by component, dense vs 2:4
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    names = list(pts)
    comps = sorted({c for n in names for c in pts[n]["bytes_per_token"]},
                   key=lambda c: -max(pts[n]["bytes_per_token"].get(c, 0) for n in names))
    bottom = np.zeros(len(names))
    for c in comps:
        v = np.array([pts[n]["bytes_per_token"].get(c, 0) / 1e6 for n in names])
        ax.bar(names, v, bottom=bottom, label=c)
        bottom += v
    ax.set_ylabel("MB per decoded token")
    ax.set_title(f"HBM bytes per token, context {context}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    art = {n: pts[n]["artifact_hbm_bytes_per_token"] / 1e9 for n in names}
    figs.append(("Bytes per token by component", _png(fig), cmd,
                 "The compiled program's own memory traffic per decode step (hw.compile's Compiled.instr_bytes): "
                 "the engine's weight and scale beats as laid out in memory (4-bit code lanes and whole 512-bit "
                 "words), the lm_head, the KV cache as QK/PV beats (a SCATTER reads and writes each word it "
                 "touches), row multipliers, norms. The artifact format needs "
                 + ", ".join(f"{n} {v:.3f} GB" for n, v in art.items()) + " (sim.estimate.bytes_per_token)."))

    # 4. dense vs 2:4: bytes, tokens/s, tokens/J side by side; the table below adds the perplexity
    q = _quality()
    fig, axs = plt.subplots(1, 3, figsize=(9.6, 3.2))
    for a, key, lab, scale in ((axs[0], "hbm_bytes_per_token", "GB per token", 1e-9),
                               (axs[1], "decode_tokens_per_s", "decode token/s", 1.0),
                               (axs[2], "tokens_per_j", "token/J", 1.0)):
        a.bar(names, [pts[n][key] * scale for n in names], color=["tab:blue", "tab:orange"][:len(names)])
        a.set_title(lab)
    figs.append(("Dense against 2:4", _png(fig), cmd,
                 "In the artifact the 2:4 pattern code (3 bits per 4 inputs) leaves 2.00 of the dense 2.25 bits per "
                 "weight: 11 % fewer bytes, not half; the perplexity cost is in the table below."))
    rows = []
    for n, r in pts.items():
        rows.append([n, r["recipe"], f"{r['format']['bits_per_weight']:.3f}", f"{r['hbm_bytes_per_token'] / 1e9:.3f}",
                     f"{r['decode_tokens_per_s']:.1f}", f"{r['tokens_per_j']:.2f}",
                     f"{q[r['recipe']]:.2f}" if q.get(r["recipe"]) else "—"])
    dense_sparse = ("<table><tr><th>weights</th><th>recipe</th><th>bits/weight</th><th>GB/token</th>"
                    "<th>decode token/s</th><th>token/J</th><th>SmolLM2-135M perplexity</th></tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                    + "</table>"
                    f"<p>Perplexity: SmolLM2-135M, 512-token held-out windows, Λ 4 + 508, float {q.get('float') or 0:.2f} "
                    f"(<code>benchmarks/results/quality.json</code>, <code>benchmarks/quality.py</code>); "
                    f"no Llama-2-7B perplexity has been measured here.</p>")

    # 5. side-by-side with AccLLM and FlightLLM
    ours = {"design": f"accllm estimate ({hw_name}, {fmt.recipe})", "model": f"{m.name}, context {context}",
            "clock_mhz": target.clock_mhz, "decode_tokens_per_s": main["decode_tokens_per_s"],
            "power_w": main["power_w"], "tokens_per_j": main["tokens_per_j"]}
    peer_rows = "".join(
        f"<tr><td>{html.escape(r['design'])}</td><td>{html.escape(r['model'])}</td><td>{r['clock_mhz']:.0f}</td>"
        f"<td>{r['decode_tokens_per_s']:.1f}</td><td>{r['power_w']:.1f}</td><td>{r['tokens_per_j']:.2f}</td></tr>"
        for r in [ours] + PEERS)
    peers = ("<table><tr><th>design</th><th>model</th><th>MHz</th><th>decode token/s</th><th>W</th>"
             f"<th>token/J</th></tr>{peer_rows}</table>")

    dec = main["decode"]
    tot = dec["cycles_per_token"]

    def rows(d: dict, limit: int | None = None) -> str:
        items = list(d.items())[:limit]
        return "".join(f"<tr><td style='text-align:left'>{html.escape(str(k))}</td><td>{v:,}</td><td>{v / tot:.1%}</td>"
                       f"</tr>" for k, v in items)

    head = "<tr><th>{}</th><th>cycles</th><th>share</th></tr>"
    by_op = dict(sorted(dec["cycles_by_op"].items(), key=lambda kv: -kv[1]))
    kinds = {f"{k} ({v['op']} x {v['count']})": v["cycles"] for k, v in dec["cycles_by_kind"].items()}
    ops_table = (f"<p>One decode step at position {dec['position']} ({dec['visible_keys']} keys visible): "
                 f"{tot:,} cycles, {dec['instructions']:,} instructions, from <code>hw.controller_model</code>'s "
                 f"timeline of the compiled program (equal to the RTL's cycle counter on the programs of "
                 f"tests/sim/test_cycle_model.py), memory latency {main['memory']['latency_cycles']} cycles and "
                 f"{main['memory']['words_per_cycle']:.3f} words per cycle per read port.</p>"
                 f"<table>{head.format('cause')}{rows(dec['cycles_by_cause'])}</table>"
                 f"<table>{head.format('opcode')}{rows(by_op)}</table>"
                 f"<table>{head.format('layer')}{rows(dec['cycles_by_layer'])}</table>"
                 f"<table>{head.format('instruction kind (layers and heads starred)')}{rows(kinds, 15)}</table>")
    pw = main["power"]
    basis = pw["basis"]  # each component's coefficient(s) and their status, from sim.energy
    power_rows = "".join(f"<tr><td>{k[:-2]}</td><td>{pw[k]:.1f}</td><td style='text-align:left'>"
                         f"{html.escape(basis[k])}</td></tr>"
                         for k in ("fpga_static_w", "fabric_dynamic_w", "hbm_w", "board_overhead_w"))
    power_table = f"<table><tr><th>component</th><th>W</th><th>basis</th></tr>{power_rows}</table>"
    c = dec["cycles_by_cause"]
    lat = ", ".join(f"{v:.2f} token/s at latency {k}" for k, v in dec["tokens_per_s_by_latency"].items())
    binds = (f"Decode is bound by <b>{main['bound_by']}</b>. Of the step's {tot:,} cycles "
             f"({1e3 * dec['step_seconds']:.1f} ms at {target.clock_mhz:.0f} MHz), "
             f"{c['memory_port'] / tot:.0%} are ENGINE streams waiting on their read port's words "
             f"({main['memory']['port_gbps']:.1f} GB/s per port, one word per cycle at most; the weights on "
             f"{main['accelerator']['weight_lanes']} port(s) at once), "
             f"{c['sfu'] / tot:.0%} the special-function units, {c['memory_ops'] / tot:.0%} LOAD/STORE/SCATTER/MARK, "
             f"{c['engine'] / tot:.0%} the engine's own setup, activation loads and drain and {c['controller'] / tot:.0%} "
             f"the controller's per-instruction overhead. The program moves {main['hbm_bytes_per_token'] / 1e9:.3f} GB "
             f"per token (the artifact format {main['artifact_hbm_bytes_per_token'] / 1e9:.3f} GB): at 425 GB/s that "
             f"is {1e3 * main['hbm']['seconds_per_token']:.2f} ms, so the HBM itself is "
             f"{main['hbm']['seconds_per_token'] / dec['step_seconds']:.1%} busy. The estimate is "
             f"{main['of_roofline']:.1%} of the 460 GB/s roofline of the program's bytes "
             f"({main['hbm_roofline_tokens_per_s']:.1f} token/s). Memory latency (not measured): {lat}. "
             f"Prefill is bound by {main['prefill']['bound_by']}.")
    sections = "".join(
        f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b64}'>"
        f"<p>{html.escape(note)}</p><pre>$ {html.escape(c)}</pre>" for t, b64, c, note in figs)
    summary_keys = ("decode_tokens_per_s", "prefill_tokens_per_s", "power_w", "tokens_per_j", "hbm_bytes_per_token",
                    "hbm_roofline_tokens_per_s", "clock_mhz", "bound_by", "scope")
    summary = {k: main[k] for k in summary_keys}
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>accllm estimate: {html.escape(m.name)} on {html.escape(hw_name)}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #999;padding:4px 8px;text-align:right}}th{{background:#eee}}pre{{background:#f4f4f4;padding:6px}}
img{{max-width:100%}} .warn{{background:#fff3cd;padding:8px;border:1px solid #e0c060}}</style></head><body>
<h1>{html.escape(m.name)} / {html.escape(fmt.recipe)} on {html.escape(hw_name)} at {target.clock_mhz:.0f} MHz</h1>
<p class="warn">Scope: <b>{html.escape(SCOPE)}</b>. Power: {pw['unverified_share']:.1%} of the {pw['total_w']:.1f} W come
from coefficients marked <i>unverified</i> in <code>sim/energy.py</code> ({html.escape(', '.join(pw['unverified_coefficients']) or 'none')});
the cited ones are read from a Vivado power report of another xcu280 design, an xbutil log of another U280 design
and an HBM2 energy model, so tokens/J is a model of this engine on the board, not a measurement (docs/estimate.md, "Energy model").</p>
<pre>{html.escape(json.dumps(summary, indent=1))}</pre>
<pre>$ {html.escape(est_cmd)}</pre>
<h2>What binds</h2><p>{binds}</p>
<h2>Against AccLLM and FlightLLM</h2>{peers}
<p>Peer figures from ../shared/ANCHORS.md: AccLLM's are simulated, FlightLLM's measured on a U280 board.</p>
{sections}
<h2>Dense against 2:4: figures and perplexity</h2>{dense_sparse}
<h2>Cycles by cause, opcode, layer and instruction (decode)</h2>{ops_table}
<h2>Power by component</h2>{power_table}<p>Resources: {html.escape(pw['resources']['source'])}; activity: engine
{pw['activity']['engine']:.3f}, special-function units {pw['activity']['special_functions']:.3f}, the rest of the
accelerator 1 (an upper bound). Coefficients and their sources: docs/estimate.md, "Energy model".</p>
</body></html>
"""
    return doc, main


def write_report(out, p, target, m, recipe_arg, context, batch, *, hw_name, hw_arg, model_arg,
                 json_out=None, load_recipe=None, accel=None) -> Path:
    doc, main = build(p, target, m, recipe_arg, context, batch, hw_name, hw_arg, model_arg, load_recipe, accel)
    if json_out:  # the JSON first: the report's presence says both were written
        write_json(json_out, {"command": f"accllm report --hw {hw_arg} --model {model_arg} --recipe "
                                         f"{recipe_arg} --context {context} --batch {batch}", **main})
    return write_text(out, doc)
