"""End-to-end training of the quantization parameters (recipe modifier ``train_e2e``; EfficientQAT's E2E-QP).

After every decoder layer has been quantized (and reconstructed block by block, ``quant/reconstruct.py``)
and the lm_head too, the codes are frozen and every quantized linear becomes a
``quant.algorithms.FakeQuantLinear`` again: its group scales ŝ and mins m̂ (integer units) and its row
scales (log S, rounded to float16 in the forward pass) are trained together, through the whole quantized
model, with straight-through rounding. So the weights the optimizer evaluates are always weights the
hardware can hold, and ``FakeQuantLinear.to_quantized`` exports exactly those (integers and float16 row
scales: the integer path runs them as they are).

Objective (``TrainE2E.loss``): ``kl``, KL(float model ‖ quantized model) of the next-token distributions at
every position, averaged over the tokens (the float model is the teacher: its final hidden states are
computed once, its logits per step from them); or ``ce``, the cross-entropy of the quantized model on the
calibration text's next tokens. The training forward runs A8 and KV4 simulated with straight-through
rounding (``simulate_quant``, as the reconstruction stage does: ``quant.model.fake_act`` / ``fake_kv``)
and Λ as the recipe sets it.

Data: the calibration sequences, cut into pieces of ``seq_len`` tokens (every calibration token is used);
the last ``probe_samples`` pieces (at most a quarter of them) are held out, never trained on. Adam, ``batch_samples`` pieces per step,
drawn epoch by epoch from a seeded permutation. Safety: the loss on the held-out pieces is measured before
and after; if training made it worse, nothing changes (``improved`` False in the statistics).

Memory: the float teacher and the quantized student are whole models in float32 (with the backward
pass's activations of ``batch_samples`` × ``seq_len`` tokens): for SmolLM2-135M a few GB, for a 7B far
beyond 24 GB (not streamed per layer, unlike the rest of the pipeline).
"""

from __future__ import annotations

import time

import torch

from .algorithms import FakeQuantLinear
from .errors import QuantError
from .model import ATTN, MLP_NAMES, LlamaLM, Numerics, QLinear, linear_name
from .qlinear import QuantizedLinear
from .recipe import TrainE2E

CHUNK = 4  # sequences per no-grad forward (the teacher's pass, the probe loss)


def training_numerics(deploy: Numerics, simulate: bool) -> Numerics:
    """The numerics of the training forward: A8 / KV4 simulated (differentiable) when asked for, Λ as
    deployed."""
    sim = simulate and (deploy.a8 or deploy.kv4)
    return Numerics(a8=deploy.a8 and sim, kv4=deploy.kv4 and sim, sinks=deploy.sinks, window=deploy.window,
                    simulate=True)


def fake_quantize(model: LlamaLM, cfg: TrainE2E, nm: Numerics) -> dict[str, FakeQuantLinear]:
    """Replace every QLinear of ``model`` (in place) by a FakeQuantLinear of the same fields and switch its
    attention to ``nm``. -> the modules whose fields are trained, by linear name (the lm_head's only if
    ``cfg.lm_head``; a frozen one is still a FakeQuantLinear, for its differentiable A8)."""
    out: dict[str, FakeQuantLinear] = {}
    rs = cfg.row_scale_lr > 0
    dev = model.device
    for i, lay in enumerate(model.layers):
        lay.self_attn.nm = nm
        for p in ATTN + MLP_NAMES:
            parent = lay.self_attn if p in ATTN else lay.mlp
            m = getattr(parent, p)
            if isinstance(m, QLinear):
                fq = FakeQuantLinear(m.q, train_row_scale=rs, a8=nm.a8).to(dev)
                setattr(parent, p, fq)
                out[linear_name(i, p)] = fq
    if isinstance(model.lm_head, QLinear):
        fq = FakeQuantLinear(model.lm_head.q, train_row_scale=rs and cfg.lm_head, a8=nm.a8).to(dev)
        model.lm_head = fq
        if cfg.lm_head:
            out["lm_head"] = fq
        else:
            fq.requires_grad_(False)
    return out


def hidden(model: LlamaLM, ids: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output (before the final norm) for ids (B, T), on the float route."""
    pos = torch.arange(ids.shape[1], device=model.device)
    h = model.embed_tokens[ids.to(model.device)]
    for layer in model.layers:
        h = layer(h, model.rope, pos)
    return h


def objective(logits: torch.Tensor, ids: torch.Tensor, t_logits: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Mean loss per token of the student's logits (B, T, V): ``kl`` against the teacher's logits,
    ``ce`` against the next tokens of ids (B, T)."""
    if kind == "kl":
        lt = torch.log_softmax(t_logits, dim=-1)
        ls = torch.log_softmax(logits, dim=-1)
        return (lt.exp() * (lt - ls)).sum(-1).mean()
    if kind == "ce":
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
    raise QuantError(f"train_e2e.loss {kind!r}: choose kl or ce")


def training_ids(cfg: TrainE2E, run) -> tuple[torch.Tensor, dict | None]:
    """The stage's training sequences -> (ids (N, L), where they came from or None): the pipeline's
    calibration sequences, or ``cfg.samples`` windows of the calibration length drawn from ``cfg.text``
    (``quant.data.calibration_windows`` with the run's seed; a missing or too short text is refused)."""
    if not cfg.text:
        return run.ids, None
    from .data import calibration_windows

    try:
        ids, info = calibration_windows(run.tok, cfg.text, cfg.samples, int(run.ids.shape[1]), run.seed)
    except QuantError as e:
        hint = " (for this stage: a longer train_e2e.text or fewer train_e2e.samples)" if "too short" in str(e) else ""
        raise QuantError(f"train_e2e.text: {e}{hint}") from None
    return ids, {"text": str(info["text"]), "tokens_in_text": info["tokens_in_text"], "samples": info["samples"],
                 "seq_len": info["seq_len"], "windows": info["windows"]}


def pieces(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Calibration sequences (N, L) cut into (N · ⌊L / seq_len⌋, seq_len) pieces (0: as they are)."""
    if seq_len <= 0 or seq_len >= ids.shape[1]:
        return ids
    k = ids.shape[1] // seq_len
    return ids[:, : k * seq_len].reshape(-1, seq_len).contiguous()


def train_e2e(student: LlamaLM, teacher: LlamaLM, ids: torch.Tensor, cfg: TrainE2E, seed: int = 0,
              deploy: Numerics | None = None, progress: bool = False) -> tuple[dict[str, QuantizedLinear], dict]:
    """Train the quantized fields of ``student`` (a LlamaLM whose quantized linears are QLinear, as
    ``load_artifact`` gives it) against ``teacher`` (the float model) on the calibration ids (N, L).

    -> (linear name -> trained QuantizedLinear, statistics). The name map is empty when training did not
    lower the held-out loss. ``student`` is changed in place (its QLinear become FakeQuantLinear): build
    the model anew from the returned fields."""
    from tqdm import tqdm

    t0 = time.time()
    deploy = deploy or student.numerics
    nm = training_numerics(deploy, cfg.simulate_quant)
    fq = fake_quantize(student, cfg, nm)
    if not fq:
        raise QuantError("train_e2e: the model has no quantized linear to train")
    if teacher.device != student.device:
        raise QuantError(f"train_e2e: the teacher is on {teacher.device}, the student on {student.device}; "
                         f"put both on one device")
    data = pieces(ids, cfg.seq_len).to(student.device)
    if data.shape[0] < 2:
        raise QuantError(f"train_e2e: {data.shape[0]} training sequence of {data.shape[1]} tokens: one must be "
                         f"held out and one trained on; calibrate on more sequences (--calib-samples) or lower "
                         f"train_e2e.seq_len")
    n_probe = min(cfg.probe_samples, max(1, data.shape[0] // 4))  # at most a quarter held out
    train, probe = data[:-n_probe], data[-n_probe:]
    with torch.no_grad():  # the teacher's final hidden states, once (its logits per batch from them)
        th = torch.cat([hidden(teacher, data[s: s + CHUNK]) for s in range(0, data.shape[0], CHUNK)])
    th_train, th_probe = th[:-n_probe], th[-n_probe:]

    def batch_loss(x, h_t):
        t_logits = None if cfg.loss != "kl" else teacher.head(h_t)
        return objective(student.head(hidden(student, x)), x, t_logits, cfg.loss)

    @torch.no_grad()
    def probe_loss() -> float:
        tot = 0.0
        for s in range(0, probe.shape[0], CHUNK):
            tot += float(batch_loss(probe[s: s + CHUNK], th_probe[s: s + CHUNK])) * probe[s: s + CHUNK].shape[0]
        return tot / probe.shape[0]

    mods = list(fq.values())
    groups = [{"params": [p for m in mods for p in (m.s, m.m)], "lr": cfg.lr}]
    if cfg.row_scale_lr > 0:
        groups.append({"params": [m.log_row_scale for m in mods], "lr": cfg.row_scale_lr})
    opt = torch.optim.Adam(groups)
    before = probe_loss()
    g = torch.Generator(device="cpu").manual_seed(seed)  # the CPU's stream: the same batches on any device
    n, b = train.shape[0], min(cfg.batch_samples, train.shape[0])
    order, at = torch.randperm(n, generator=g, device="cpu").to(data.device), 0
    trace, acc, every = [], [], max(1, cfg.steps // 10)
    with torch.enable_grad():
        for step in tqdm(range(cfg.steps), desc="train_e2e", unit="step", disable=not progress):
            if at + b > n:  # a new epoch
                order, at = torch.randperm(n, generator=g, device="cpu").to(data.device), 0
            idx = order[at: at + b]
            at += b
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(train[idx], th_train[idx])
            loss.backward()
            opt.step()
            acc.append(float(loss.detach()))
            if len(acc) == every or step == cfg.steps - 1:
                trace.append(sum(acc) / len(acc))
                acc = []
    after = probe_loss()
    improved = after < before
    tuned = {name: m.to_quantized() for name, m in fq.items()} if improved else {}
    stats = {"loss": cfg.loss, "probe_loss_before": before, "probe_loss_after": after, "improved": bool(improved),
             "steps": cfg.steps, "train_sequences": int(n), "probe_sequences": int(n_probe),
             "seq_len": int(data.shape[1]), "tokens_trained": int(cfg.steps * b * data.shape[1]),
             "train_loss_trace": trace, "trace_every": every, "linears": len(fq),
             "seconds": round(time.time() - t0, 3)}
    return tuned, stats
