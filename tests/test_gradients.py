"""Vectorised per-sample gradient statistics equal the one-backward-per-sample loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from tatr.core.gradients import gradient_stats, gradient_stats_loop


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def vit() -> tuple[VisionTransformer, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    head = F.normalize(torch.randn(5, 16), dim=-1)
    x, y = torch.randn(11, 3, 16, 16), torch.randint(0, 5, (11,))
    return model.eval(), head, x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_equals_loop(vit, dtype: torch.dtype) -> None:
    model, head, x, y = vit
    model = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    model.load_state_dict(vit[0].state_dict())
    model = model.to(dtype).eval()
    batches = [(x[:6].to(dtype), y[:6]), (x[6:].to(dtype), y[6:])]  # uneven batches and chunks
    fast_abs, fast_signed = gradient_stats(model, head.to(dtype), 20.0, batches, chunk=4)
    ref_abs, ref_signed = gradient_stats_loop(model, head.to(dtype), 20.0, batches)
    assert fast_abs.keys() == ref_abs.keys() == dict(model.named_parameters()).keys()
    for k in ref_abs:
        assert _rel(fast_abs[k], ref_abs[k]) < 1e-6, k
        assert _rel(fast_signed[k], ref_signed[k]) < 1e-6, k
        assert fast_abs[k].dtype == torch.float32


def test_abs_mean_is_not_the_abs_of_the_mean(vit) -> None:
    """Guards against a 'fast path' that takes one batch gradient: |mean g| ≤ mean |g|, strictly here."""
    model, head, x, y = vit
    abs_mean, signed_mean = gradient_stats(model, head, 20.0, [(x, y)])
    w = "transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.all(abs_mean[w] >= signed_mean[w].abs() - 1e-7)
    assert float((abs_mean[w] - signed_mean[w].abs()).sum()) > 1e-3 * float(abs_mean[w].sum())
    # and the signed mean is the ordinary batch-mean gradient
    params = dict(model.named_parameters())
    loss = F.cross_entropy(20.0 * F.normalize(model(x), dim=-1) @ head.T, y)
    (g,) = torch.autograd.grad(loss, [params[w]])
    assert _rel(signed_mean[w], g) < 1e-5


def test_chunk_size_and_attention_kernel_do_not_change_results(vit) -> None:
    model, head, x, y = vit
    ref, _ = gradient_stats(model, head, 20.0, [(x, y)], chunk=11)
    for chunk, math in ((1, True), (3, True), (5, False)):
        with warnings.catch_warnings():  # the fused kernel's slow vmap fallback warns; expected here
            warnings.simplefilter("ignore", UserWarning)
            got, _ = gradient_stats(model, head, 20.0, [(x, y)], chunk=chunk, math_attention=math)
        for k in ref:
            assert _rel(got[k], ref[k]) < 1e-6, (chunk, math, k)


def test_parameter_subset_and_errors(vit) -> None:
    model, head, x, y = vit
    names = ["proj", "ln_post.weight"]
    abs_mean, _ = gradient_stats(model, head, 20.0, [(x, y)], names=names)
    ref, _ = gradient_stats_loop(model, head, 20.0, [(x, y)], names=names)
    assert sorted(abs_mean) == sorted(names)
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards
    for k in names:
        assert _rel(abs_mean[k], ref[k]) < 1e-6
    with pytest.raises(KeyError, match="not parameters"):
        gradient_stats(model, head, 20.0, [(x, y)], names=["nope"])
    with pytest.raises(ValueError, match="no exemplars"):
        gradient_stats(model, head, 20.0, [])
    with pytest.raises(ValueError, match="chunk"):
        gradient_stats(model, head, 20.0, [(x, y)], chunk=0)


def test_auto_chunk_bounds_memory() -> None:
    from tatr.core.gradients import auto_chunk

    assert auto_chunk(237_216) == 32  # the testbed encoder: capped
    assert auto_chunk(87_849_216) == 3  # ViT-B/32: 3 × 88M fp32 gradients ≈ 1 GiB
    assert auto_chunk(10**10) == 1
