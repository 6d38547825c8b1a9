"""The float route's quantizers (quant.model: A8 and KV4 in torch, used by calibration and the float
evaluation route) equal quant.reference element for element. The integer route (the whole decoder) is
checked against the golden model in test_integer.py."""

import numpy as np
import pytest
import torch

from quant import model as M
from quant import reference as R

pytestmark = pytest.mark.model


def _np(t):
    return t.detach().cpu().numpy()


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
