"""bench/lora_linear.py: its fused-K prototype computes what the model's LoraLinear computes, so the
benchmark compares two formulations of one function."""

import torch

from bench.lora_linear import FusedKLora
from modeling.lora import LoraLinear


def test_fused_k_lora_equals_lora_linear_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    linear = LoraLinear(16, 24, bias=False, rank=4, scaling=2.0, dtype=torch.float64, adapter_dtype=torch.float64)
    for p in linear.parameters():
        with torch.no_grad():
            p.normal_(generator=g)
    linear.weight.requires_grad_(False)
    x = torch.randn(10, 16, dtype=torch.float64, generator=g, requires_grad=True)
    grad_y = torch.randn(10, 24, dtype=torch.float64, generator=g)
    leaves = (x, linear.lora_A, linear.lora_B)
    want = torch.autograd.grad(linear(x), leaves, grad_y)
    y = FusedKLora.apply(x, linear.weight, linear.lora_A, linear.lora_B, linear.scaling)
    torch.testing.assert_close(y, linear(x), rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(y, leaves, grad_y), want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: FusedKLora.apply(t[0], linear.weight, t[1], t[2], 2.0), leaves)
