"""Expert parallelism on CPU (4 gloo processes; EP of 4 and of 2) against the single-device MergedExperts.

Every rank builds the same full MergedExperts from a fixed seed and its own tokens and routing from a
seed of its own, so any rank can recompute any other rank's single-device reference. That gives the
expected expert-parameter gradients (the sum over all ranks' tokens) without trusting a collective.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from modeling.training_form import MergedExperts
from runtime.expert_parallel import ExpertParallelExperts
from runtime.mesh import free_port

E, D, F, K = 8, 64, 32, 2  # the tiny config's expert sizes, top-2 routing




def _merged_experts():
    """The same full expert block on every rank."""
    torch.manual_seed(1234)
    merged = MergedExperts(E, D, F, dtype=torch.float32)
    with torch.no_grad():
        merged.gate_up_proj_E2FD.normal_(std=0.1)
        merged.down_proj_EDF.normal_(std=0.1)
    return merged


def _rank_inputs(rank, allowed_experts, case_seed):
    """Rank `rank`'s tokens (a different count on each rank), routing to K distinct experts drawn from
    allowed_experts, positive routing weights, and the gradient fed to the output."""
    g = torch.Generator().manual_seed(100 * case_seed + rank)
    T = 16 + 8 * rank
    x = torch.randn(T, D, generator=g)
    allowed = torch.tensor(allowed_experts)
    idx = allowed[torch.rand(T, len(allowed_experts), generator=g).topk(K, dim=-1).indices]
    weight = torch.rand(T, K, generator=g).softmax(dim=-1)
    grad_out = torch.randn(T, D, generator=g)
    return x, idx, weight, grad_out


def _reference(merged, x, idx, weight, grad_out):
    """Single-device output and gradients (x, weight, expert parameters) for one rank's tokens."""
    merged.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    y = merged(x, idx, weight)
    y.backward(grad_out)
    return (y.detach(), x.grad, weight.grad,
            merged.gate_up_proj_E2FD.grad.clone(), merged.down_proj_EDF.grad.clone())


def _assert_close(actual, expected, what):
    # Relative error of the whole tensor; an all-zero reference (an expert nobody routes to) must
    # be matched by zeros.
    assert actual is not None, f"{what}: no gradient"
    err = (actual - expected).norm().item()
    assert err <= 1e-5 * expected.norm().item() + 1e-12, f"{what}: error {err:.3g}, norm {expected.norm():.3g}"


def _check_case(merged, ep_experts, members, allowed_experts, case_seed):
    """One forward and backward of this rank's EP module against the single-device references.
    members: the global ranks of this rank's EP group, in group order (their tokens are the ones
    that reach this rank's experts)."""
    rank = dist.get_rank()
    x, idx, weight, grad_out = _rank_inputs(rank, allowed_experts, case_seed)
    y_ref, x_grad_ref, w_grad_ref, _, _ = _reference(merged, x, idx, weight, grad_out)

    # The expected parameter gradient: single-device gradients summed over the group's tokens.
    gate_up_grad_sum = torch.zeros_like(merged.gate_up_proj_E2FD)
    down_grad_sum = torch.zeros_like(merged.down_proj_EDF)
    for member in members:
        *_, gate_up_grad, down_grad = _reference(merged, *_rank_inputs(member, allowed_experts, case_seed))
        gate_up_grad_sum += gate_up_grad
        down_grad_sum += down_grad

    ep_experts.zero_grad(set_to_none=True)
    x_ep = x.clone().requires_grad_()
    weight_ep = weight.clone().requires_grad_()
    y = ep_experts(x_ep, idx, weight_ep)
    assert y.shape == x.shape and y.dtype == x.dtype
    _assert_close(y.detach(), y_ref, "output")
    y.backward(grad_out)
    _assert_close(x_ep.grad, x_grad_ref, "x.grad")
    _assert_close(weight_ep.grad, w_grad_ref, "topk_weight.grad")
    local = slice(ep_experts.expert_offset, ep_experts.expert_offset + ep_experts.num_local_experts)
    _assert_close(ep_experts.gate_up_proj_E2FD.grad, gate_up_grad_sum[local], "gate_up_proj_E2FD.grad")
    _assert_close(ep_experts.down_proj_EDF.grad, down_grad_sum[local], "down_proj_EDF.grad")


def _check_ep_group(merged, ep_group, members):
    """Construction and two routings for one EP group (a ProcessGroup or a 1-D DeviceMesh)."""
    ep_size, ep_rank = len(members), members.index(dist.get_rank())
    ep_experts = ExpertParallelExperts(merged, ep_group)

    # Same parameter names, this rank's slice of the experts; the EP rank is the rank in the group.
    local_experts = E // ep_size
    assert (ep_experts.num_experts, ep_experts.ep_size, ep_experts.ep_rank) == (E, ep_size, ep_rank)
    assert ep_experts.expert_offset == ep_rank * local_experts
    assert [name for name, _ in ep_experts.named_parameters()] == ["gate_up_proj_E2FD", "down_proj_EDF"]
    local = slice(ep_rank * local_experts, (ep_rank + 1) * local_experts)
    assert torch.equal(ep_experts.gate_up_proj_E2FD, merged.gate_up_proj_E2FD[local])
    assert torch.equal(ep_experts.down_proj_EDF, merged.down_proj_EDF[local])

    # Routing over all experts.
    _check_case(merged, ep_experts, members, list(range(E)), case_seed=1)
    # Nobody routes to expert 0 nor to any expert of EP rank 1: an expert with no rows on a rank
    # that has some, and a rank that receives nothing at all (but still sends).
    unused = {0} | set(range(local_experts, 2 * local_experts))
    _check_case(merged, ep_experts, members, [e for e in range(E) if e not in unused], case_seed=2)

    # From a meta module: local shapes on meta, no values.
    with torch.device("meta"):
        meta_merged = MergedExperts(E, D, F)
    meta_ep = ExpertParallelExperts(meta_merged, ep_group)
    assert meta_ep.gate_up_proj_E2FD.is_meta and meta_ep.gate_up_proj_E2FD.shape == (local_experts, 2, F, D)
    assert meta_ep.down_proj_EDF.is_meta and meta_ep.down_proj_EDF.shape == (local_experts, D, F)

    # An expert count the EP degree does not divide.
    bad_num_experts = 2 * ep_size + 1
    with pytest.raises(ValueError, match=rf"n_routed_experts={bad_num_experts}.*ep={ep_size}"):
        ExpertParallelExperts(MergedExperts(bad_num_experts, D, F, device="meta"), ep_group)


def _worker(rank, world_size, port):
    torch.set_num_threads(1)  # several processes share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        merged = _merged_experts()
        # EP of 4 over the whole world, given as a ProcessGroup.
        _check_ep_group(merged, dist.group.WORLD, list(range(world_size)))
        # EP of 2 as the inner dimension of a (dp=2, ep=2) DeviceMesh: groups {0, 1} and {2, 3},
        # so ranks 2 and 3 are EP ranks 0 and 1 (the EP rank is not the global rank).
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        first = rank - rank % 2
        _check_ep_group(merged, mesh["ep"], [first, first + 1])
    finally:
        dist.destroy_process_group()


def test_expert_parallel_matches_single_device():
    # One 4-process world covers both EP degrees (4, and 2 twice over): every spawned process
    # spends a few seconds importing torch, so a second, 2-process world would double the time.
    mp.spawn(_worker, args=(4, free_port()), nprocs=4, join=True)
