"""Perplexity and greedy generation, for a float checkpoint or an accllm artifact."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .data import eval_windows
from .errors import QuantError
from .loading import load_model


#: Bootstrap resamples and seed behind every confidence interval (numpy default_rng(seed)).
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


@torch.no_grad()
def perplexity(model, tokenizer, text: str | Path | None, seq_len: int = 512, max_tokens: int | None = None,
               progress: bool = True, bootstrap: int = BOOTSTRAP_SAMPLES) -> dict:
    """Perplexity of ``model`` (a quant.model.LlamaLM, numerics as set) over non-overlapping windows.
    ``tokens`` counts the predicted tokens (each window predicts all but its first).

    Also returned: ``window_nll`` / ``window_tokens`` (summed negative log-likelihood and predicted tokens
    per window: what paired comparisons resample), ``ci95`` (a 95 % percentile-bootstrap interval for the
    perplexity, resampling whole windows: neighbouring tokens are not independent, windows nearly are),
    ``text`` / ``text_sha256`` / ``tokens_in_text`` and the attention used (``sinks``, ``window``)."""
    from tqdm import tqdm

    wins, info = eval_windows(tokenizer, text, seq_len, max_tokens)
    logits = (model(w[None])[0] for w in tqdm(wins, desc="eval", unit="window", disable=not progress))
    return _result(logits, wins, info, model.numerics, seq_len, bootstrap)


def _result(logits, wins, info, nm, seq_len, bootstrap) -> dict:
    """perplexity's result from each window's logits (an iterable, consumed once, in window order)."""
    nll, cnt = [], []
    for w, lg in zip(wins, logits, strict=True):
        nll.append(float(torch.nn.functional.cross_entropy(lg[:-1].to(torch.float64), w[1:].to(lg.device),
                                                          reduction="sum")))
        cnt.append(int(w.numel() - 1))
    window = getattr(nm, "window", None)  # (a peer's model, benchmarks/peers.py, has full attention only)
    res = {"perplexity": math.exp(sum(nll) / sum(cnt)), "tokens": sum(cnt), "seq_len": seq_len,
           "integer_path": bool(nm.integer_path), "windows": len(wins),
           "sinks": int(nm.sinks) if window is not None else 0, "window": window,
           "text": info["text"], "text_sha256": info["sha256"], "tokens_in_text": info["tokens_in_text"],
           "window_nll": nll, "window_tokens": cnt}
    res["ci95"] = perplexity_ci(res, bootstrap)
    res["bootstrap"] = {"samples": bootstrap, "seed": BOOTSTRAP_SEED, "unit": "window"}
    return res


@torch.no_grad()
def stream_logits(parts, model, wins, progress: bool = False):
    """Each window's logits, as ``model(w[None])[0]`` gives them, with the decoder layers read one at a time:
    every window's hidden state goes through layer i, then layer i is dropped and layer i + 1 read
    (``parts.layer(i)``, from the checkpoint or the artifact). ``model`` is ``parts.shell()`` (embedding,
    final norm, lm_head: no decoder layers) with its numerics set. The same calls as LlamaLM.forward (the
    float route) and integer.Decoder.forward (the integer route) per window, so the same logits exactly.
    Yields the logits window by window (window order) after the last layer."""
    from tqdm import tqdm

    if len(model.layers):
        raise QuantError("stream_logits: the model holds decoder layers; give parts.shell() (no layers)")
    integer = bool(model.numerics.integer_path)
    dev = model.device
    if integer:
        from .integer import to_float_logits
        from .model import integer_layer

        dec = model.integer_decoder()
        hs = [dec.embed_tokens(w, 0) for w in wins]  # (x (T, H), positions)
    else:
        pos = [torch.arange(w.numel(), device=dev) for w in wins]
        hs = [model.embed_tokens[w[None].to(dev)] for w in wins]
    bar = tqdm(total=parts.n_layers * len(wins), desc="eval (streamed)", unit="window-layer", disable=not progress)
    for i in range(parts.n_layers):
        layer = parts.layer(i)
        if integer:
            lay = dec.build_layer(dec.spec.check_layer(i, integer_layer(i, layer)))
            del layer
            for j, (x, p) in enumerate(hs):
                hs[j] = (dec.layer(i, x, p, dec.new_cache(), None, lay), p)
                bar.update()
        else:
            layer = layer.to(dev)
            for j in range(len(hs)):
                hs[j] = layer(hs[j], model.rope, pos[j])
                bar.update()
        lay = layer = None  # layer i is freed before layer i + 1 is read
    bar.close()
    for j in range(len(hs)):
        h, hs[j] = hs[j], None
        yield to_float_logits(dec.head(h[0])) if integer else model.head(h)[0]


def _resample(n_windows: int, samples: int) -> np.ndarray:
    """(samples, n_windows) window indices drawn with replacement; the same for every call with the same
    (n_windows, samples), so intervals are reproducible and two results resample the same windows."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n_windows, size=(samples, n_windows))


def perplexity_ci(res: dict, samples: int = BOOTSTRAP_SAMPLES) -> list[float] | None:
    """95 % percentile-bootstrap interval of the perplexity, over windows. None for a single window."""
    nll, cnt = np.asarray(res["window_nll"]), np.asarray(res["window_tokens"], dtype=np.float64)
    if len(nll) < 2 or samples < 1:
        return None
    idx = _resample(len(nll), samples)
    ppl = np.exp(nll[idx].sum(1) / cnt[idx].sum(1))
    lo, hi = np.percentile(ppl, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_ratio(res: dict, ref: dict, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Perplexity ratio ``res`` / ``ref`` with a paired 95 % bootstrap interval: both results must come
    from the same windows of the same text (same text hash, seq_len and window lengths); each resample
    draws the same windows for both, so what the two models share (the text's hard passages) cancels.
    -> {"ratio", "ci95", "against": ref's perplexity}."""
    for k in ("text_sha256", "seq_len", "window_tokens"):
        if res.get(k) != ref.get(k):
            raise QuantError(f"paired ratio: the two evaluations differ in {k} ({_short(res.get(k))} against "
                             f"{_short(ref.get(k))}); evaluate both on the same --text, --seq-len and --max-tokens")
    a, b = np.asarray(res["window_nll"]), np.asarray(ref["window_nll"])
    cnt = np.asarray(res["window_tokens"], dtype=np.float64)
    ratio = math.exp((a.sum() - b.sum()) / cnt.sum())
    ci = None
    if len(a) >= 2 and samples >= 1:
        idx = _resample(len(a), samples)
        r = np.exp((a[idx].sum(1) - b[idx].sum(1)) / cnt[idx].sum(1))
        ci = [float(x) for x in np.percentile(r, [2.5, 97.5])]
    return {"ratio": ratio, "ci95": ci, "against": ref["perplexity"]}


def _short(v):
    return f"{len(v)} windows" if isinstance(v, list) else repr(v)


def _set_integer_path(model, integer_path: bool | None, where: str, parts=None) -> bool:
    """The integer route (the whole decoder in integers) by default whenever the model can run it; asked
    for explicitly on a model that cannot, a clear error says what is float. ``parts``: the model is a
    streamed shell (no decoder layers) and ``parts`` says what its layers are."""
    why = model.integer_unready() if hasattr(model, "integer_unready") else "not an accllm model"
    if parts is not None and why is None and parts.float_linear():
        why = f"the integer path needs every linear quantized; {parts.float_linear()} is float"
    if not (model.quantized if parts is None else parts.quantized):
        why = "this model has no quantized linear layers"
    if integer_path is None:
        integer_path = why is None
    if integer_path and why:
        raise QuantError(f"{where}: cannot evaluate on the integer path: {why}. Evaluate it with --float-path")
    model.numerics.integer_path = bool(integer_path)
    return bool(integer_path)


def parse_attention(spec) -> tuple[int, int | None] | None:
    """--attention: None or "model" (the model's own), "full", "SINKS,WINDOW" or a (sinks, window) pair
    -> None (keep) or (sinks, window or None)."""
    if spec is None or spec == "model":
        return None
    if spec == "full":
        return (0, None)
    try:
        sinks, window = (spec.split(",") if isinstance(spec, str) else spec)
        sinks, window = int(sinks), int(window)
    except (ValueError, TypeError):
        raise QuantError(f"--attention {spec!r}: give 'model', 'full' or SINKS,WINDOW (e.g. 4,508)") from None
    if sinks < 0 or window < 1:
        raise QuantError(f"--attention {spec!r}: sinks must be >= 0 and the window >= 1")
    return (sinks, window)


def _set_attention(model, attention) -> None:
    att = parse_attention(attention)
    if att is not None:
        model.numerics.sinks, model.numerics.window = att


def effective_attention(sinks, window, seq_len) -> tuple[int, int] | None:
    """None for full attention, which a Λ window covering the whole window of seq_len tokens is."""
    if window is None or seq_len is None or int(sinks or 0) + int(window) >= int(seq_len):
        return None
    return (int(sinks or 0), int(window))


def load_result(path: str | Path) -> dict:
    """A result written by ``accllm eval --json`` (it must hold the per-window losses)."""
    import json

    p = Path(path)
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise QuantError(f"--against {p}: cannot read it as JSON ({e})") from e
    if not isinstance(res, dict) or "window_nll" not in res:
        raise QuantError(f"--against {p}: not an `accllm eval --json` result with per-window losses "
                         f"(window_nll); evaluate the reference again with this version")
    return res


def evaluate(model_or_artifact: str, text: str | Path | None, seq_len: int = 512, max_tokens: int | None = None,
             integer_path: bool | None = None, progress: bool = True,
             attention=None, against: str | dict | None = None, bootstrap: int = BOOTSTRAP_SAMPLES,
             stream_layers: bool = False, device=None) -> dict:
    """-> :func:`perplexity`'s result ({"perplexity", "tokens", "seq_len", "integer_path", "ci95", ...}).
    ``integer_path`` defaults to True for an artifact with quantized layers (W×A8), else False.
    ``attention``: see :func:`parse_attention`. ``against``: a reference (a model or artifact to evaluate
    on the float path with the same windows and the same attention, or a previous result: a dict or the
    path of an ``accllm eval --json`` output); the result then has ``ratio`` = :func:`paired_ratio`.
    ``stream_layers``: read the decoder layers one at a time (:func:`stream_logits`) instead of loading the
    whole model, for a model bigger than memory; the same result exactly (and ``"streamed": True``).
    ``device``: where the model runs (``quant.runtime.resolve_device``: cpu, cuda, cuda:N); the integer path
    gives the same integers on any device, the float path the same up to float rounding."""
    from .runtime import resolve_device

    dev = resolve_device(device)
    if bootstrap < 0:
        raise QuantError(f"--bootstrap must be >= 0, got {bootstrap}")
    ref = None
    if isinstance(against, (str, Path)) and str(against).endswith(".json"):
        ref = load_result(against)  # read it first: a bad file fails before the long evaluation
    elif isinstance(against, dict):
        ref = against
    model, tok, parts = open_model(model_or_artifact, stream_layers, dev)
    _set_integer_path(model, integer_path, str(model_or_artifact), parts)
    _set_attention(model, attention)
    mine = effective_attention(model.numerics.sinks, model.numerics.window, seq_len)
    if ref is not None and effective_attention(ref.get("sinks"), ref.get("window"), ref.get("seq_len")) != mine:
        raise QuantError(f"--against: the reference was evaluated with attention (sinks, window) = "
                         f"({ref.get('sinks')}, {ref.get('window')}) at seq_len {ref.get('seq_len')}, this model "
                         f"runs ({model.numerics.sinks}, {model.numerics.window}) at {seq_len}; pass --attention "
                         f"so both use the same")
    res = perplexity_of(model, tok, parts, text, seq_len, max_tokens, progress, bootstrap)
    res["model"] = str(model_or_artifact)
    res["device"] = str(dev)
    if against is not None:
        if ref is None:
            del model
            rmodel, rtok, rparts = open_model(str(against), stream_layers, dev)
            _set_integer_path(rmodel, False, str(against), rparts)
            rmodel.numerics.sinks, rmodel.numerics.window = res["sinks"], res["window"]
            ref = perplexity_of(rmodel, rtok, rparts, text, seq_len, max_tokens, progress, bootstrap)
            ref["model"] = str(against)
        res["ratio"] = paired_ratio(res, ref, bootstrap)
        res["ratio"]["against_model"] = ref.get("model")
    return res


def open_model(source, stream_layers: bool, device=None):
    """-> (model, tokenizer, parts) on ``device`` (default the CPU): the whole model and None, or (streamed)
    the shell without decoder layers and the parts that read them one at a time (each moved to the device as
    it is used)."""
    if not stream_layers:
        return (*load_model(source, device or "cpu"), None)
    from .loading import open_parts

    if not isinstance(source, (str, Path)):
        raise QuantError(f"--stream-layers: {source!r} is not a model path; a streamed evaluation reads the "
                         f"layers from a checkpoint folder, .gguf file or artifact")
    parts = open_parts(str(source))
    if parts.n_layers < 1:
        raise QuantError(f"--stream-layers: {source} has no decoder layers to stream")
    return parts.shell().to(device or "cpu"), parts.tokenizer(), parts


@torch.no_grad()
def perplexity_of(model, tok, parts, text, seq_len, max_tokens, progress, bootstrap) -> dict:
    if parts is None:
        return perplexity(model, tok, text, seq_len, max_tokens, progress, bootstrap)
    wins, info = eval_windows(tok, text, seq_len, max_tokens)
    res = _result(stream_logits(parts, model, wins, progress), wins, info, model.numerics, seq_len, bootstrap)
    res["streamed"] = True
    return res


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding through the KV cache (a fixed ring of S + W slots under Λ attention)."""
    cache = model.new_cache()
    logits = None
    for n, tid in enumerate(prompt_ids):
        logits = model.step(int(tid), n, cache)
    out: list[int] = []
    n = len(prompt_ids)
    for _ in range(max_new_tokens):
        nxt = int(torch.argmax(logits))
        if eos is not None and nxt == eos:
            break
        out.append(nxt)
        logits = model.step(nxt, n, cache)
        n += 1
    return out


def generate(model_or_artifact: str, prompt: str, max_new_tokens: int = 32, device=None) -> str:
    """Greedy continuation of ``prompt`` (the new text only, without the prompt), on ``device`` (cpu,
    cuda, cuda:N; default the CPU)."""
    from .runtime import resolve_device

    dev = resolve_device(device)
    if max_new_tokens < 0:
        raise QuantError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    model, tok = load_model(model_or_artifact, dev)
    _set_integer_path(model, None, str(model_or_artifact))
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise QuantError("--prompt is empty after tokenization; give some text")
    new = generate_ids(model, ids, max_new_tokens, tok.eos_token_id)
    return tok.decode(new, skip_special_tokens=True)
