"""The model's head: logits equal the plain product with the (tied) head weight (to the last bits of
fp32: the BLAS may sum in another order for another width), although the GEMM runs against a copy
padded to a multiple of 64 rows; the copy follows the weight when it changes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_padded_head_gives_the_plain_logits_and_follows_the_weight(tiny_model):
    V, H = tiny_model.config.vocab_size, tiny_model.config.hidden_size
    h = torch.randn(5, H, generator=torch.Generator().manual_seed(0))
    w = tiny_model.lm_head.weight
    got = tiny_model.head(h)
    assert got.shape == (5, V) and got.dtype == torch.float32 and got.is_contiguous()
    _same(got, F.linear(h, w).float())
    padded = tiny_model.__dict__["_head"][1]
    assert padded.shape[0] % 64 == 0 and padded.shape[0] >= V and not padded[V:].any()
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[3].add_(1.0)  # an in-place change (a reload): the padded copy must follow
        _same(tiny_model.head(h), F.linear(h, w).float())
    finally:
        with torch.no_grad():
            w.copy_(saved)
    _same(tiny_model.head(h), got)


def test_weights_made_in_inference_mode_still_work(tiny_ckpt):
    from hymba_batch.model import load_model
    with torch.inference_mode():  # weights that keep no version counter
        model = load_model(tiny_ckpt)
        h = torch.randn(2, model.config.hidden_size)
        _same(model.head(h), F.linear(h, model.lm_head.weight).float())
