"""The fused scoring forward (Triton attention and MoE kernels) compiles under torch.compile on a GPU and gives
the eager path's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def test_compiled_fused_forward_matches_eager(small_model_factory, unit_factory):
    from explain.shapley import stack_coalitions

    model = small_model_factory()
    rng = np.random.default_rng(0)
    units = [unit_factory(i, rng) for i in range(12)]
    model.fit_normalisation(model.batch(units))
    model.eval().cuda()
    batch = model.batch(units).to("cuda")
    with torch.inference_mode():
        stacked, masks = stack_coalitions(model.encode(batch))  # 8 coalition rows per unit, no host sync
        eager = model.fuse(stacked, masks).defect_logit.float()
        compiled = torch.compile(model.fuse, fullgraph=False)
        got = compiled(stacked, masks).defect_logit.float()
        again = compiled(stacked, masks).defect_logit.float()  # the cached graph
    assert got.shape == eager.shape == (12 * 8,)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, got)
