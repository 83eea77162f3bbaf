"""Token dispatch: sorting slots by expert, group offsets, and the gather-only permutation."""

import pytest
import torch

from modeling import kernels


def _routing(T=7, K=3, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, E, generator=g).topk(K, dim=-1).indices


def test_sort_slots_groups_by_expert_and_offsets_match_counts():
    idx = _routing()
    sorted_slots, sorted_tokens, slot_position, sorted_experts = kernels.sort_slots(idx)
    flat = idx.reshape(-1)
    assert torch.equal(flat[sorted_slots].to(torch.int32), sorted_experts)
    assert bool((sorted_experts[1:] >= sorted_experts[:-1]).all())
    assert torch.equal(sorted_tokens, sorted_slots // idx.shape[1])
    assert torch.equal(slot_position[sorted_slots], torch.arange(flat.numel()))
    offsets = kernels.group_end_offsets(sorted_experts, 5)
    counts = kernels.tokens_per_expert(idx, 5)
    assert offsets.dtype == torch.int32 and torch.equal(offsets.long(), torch.cumsum(counts, 0))


def test_unpermute_of_permute_sums_each_token_k_times_and_gradients_flow():
    idx = _routing()
    T, K = idx.shape
    x = torch.randn(T, 4, dtype=torch.float64, requires_grad=True)
    _, sorted_tokens, slot_position, _ = kernels.sort_slots(idx)
    x_sorted = kernels.permute(x, sorted_tokens, slot_position, K)
    assert torch.equal(x_sorted, x.detach()[sorted_tokens])
    y = kernels.unpermute(x_sorted * 2, sorted_tokens, slot_position, K)
    torch.testing.assert_close(y, 2 * K * x.detach())
    assert torch.autograd.gradcheck(
        lambda t: kernels.unpermute(kernels.permute(t, sorted_tokens, slot_position, K).sin(),
                                      sorted_tokens, slot_position, K), (x,))


def test_weighted_swiglu_gradients():
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.rand(6, 1, dtype=torch.float64, generator=g, requires_grad=True)
    expected = torch.nn.functional.silu(gate_up[:, :4]) * gate_up[:, 4:] * weight
    torch.testing.assert_close(kernels.weighted_swiglu(gate_up, weight).double(), expected)
    # the kernel computes in float32; check its hand-written backward against autograd in float32
    gu32, w32 = gate_up.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    grad = torch.randn(6, 4, generator=g)
    kernels.weighted_swiglu(gu32, w32).backward(grad)
    gu_ref, w_ref = gate_up.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    (torch.nn.functional.silu(gu_ref[:, :4]) * gu_ref[:, 4:] * w_ref).backward(grad)
    torch.testing.assert_close(gu32.grad, gu_ref.grad)
    torch.testing.assert_close(w32.grad, w_ref.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels are compiled on CUDA only")
def test_fused_kernels_follow_eager_as_row_counts_change_every_call():
    """Expert parallelism hands the fused SwiGLU and gather-sum kernels a new row count every step:
    they must keep computing what the eager operators compute, and never hit the recompile limit."""
    from modeling.kernels import _sum_slots, set_fused_kernels, weighted_swiglu, weighted_swiglu_of_sum
    generator = torch.Generator(device="cuda").manual_seed(0)
    for rows in [4096, 4100, 3990, 4200, 4001, 3777, 4444, 4321, 5003, 3001] * 2:
        gate_up = torch.randn(rows, 2 * 64, device="cuda", dtype=torch.bfloat16, generator=generator,
                              requires_grad=True)
        update = torch.randn(rows, 2 * 64, device="cuda", dtype=torch.bfloat16, generator=generator,
                             requires_grad=True)
        weight = torch.rand(rows, 1, device="cuda", generator=generator, requires_grad=True)
        positions = torch.randperm(rows, device="cuda", generator=generator)
        results = []
        for fused in (True, False):
            set_fused_kernels(fused)
            h = weighted_swiglu(gate_up, weight)
            grads = torch.autograd.grad(h.float().square().sum(), (gate_up, weight))
            h_of_sum = weighted_swiglu_of_sum(gate_up, update, weight)  # the LoRA experts' form
            grads_of_sum = torch.autograd.grad(h_of_sum.float().square().sum(), (gate_up, update, weight))
            results.append((h, *grads, _sum_slots(gate_up.detach(), positions, 1), h_of_sum, *grads_of_sum))
        set_fused_kernels(True)
        for got, want in zip(*results):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
