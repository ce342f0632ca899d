"""InfoNCE: hand-written reference, gradients, learnable τ, and the gathered loss across 2 gloo processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hbt_ray.loss import Temperature, all_gather_with_grad, info_nce_loss


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _reference(q, p, tau, negatives=None, symmetric=False):
    """Explicit softmax cross-entropy, one row at a time."""
    cands = p if negatives is None else torch.cat([p, negatives])
    losses = []
    for i in range(q.shape[0]):
        scores = torch.stack([q[i] @ c / tau for c in cands])
        losses.append(-(scores[i] - torch.logsumexp(scores, 0)))
    loss = torch.stack(losses).mean()
    if symmetric:
        back = []
        for i in range(p.shape[0]):
            scores = torch.stack([p[i] @ x / tau for x in q])
            back.append(-(scores[i] - torch.logsumexp(scores, 0)))
        loss = (loss + torch.stack(back).mean()) / 2
    return loss


def test_matches_hand_written_cross_entropy():
    q, p, neg = _unit(5, 8, seed=0), _unit(5, 8, seed=1), _unit(3, 8, seed=2)
    for kwargs in ({}, {"negatives": neg}, {"symmetric": True}, {"negatives": neg, "symmetric": True}):
        got = info_nce_loss(q, p, 0.1, **kwargs)
        want = _reference(q, p, 0.1, **kwargs)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)


def test_known_value_identity_embeddings():
    # q = p = identity rows: the positive scores 1/τ, the other B-1 candidates 0.
    q = torch.eye(4)
    loss = info_nce_loss(q, q.clone(), 0.5)
    expected = -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 3))
    torch.testing.assert_close(loss, expected)


def test_hard_negatives_raise_the_loss():
    q = _unit(6, 16, seed=3)
    p = F.normalize(q + 0.3 * _unit(6, 16, seed=4), dim=-1)
    hard = F.normalize(q + 0.2 * _unit(6, 16, seed=5), dim=-1)  # closer to q than p is
    assert info_nce_loss(q, p, 0.05, negatives=hard) > info_nce_loss(q, p, 0.05) + 0.1


def test_gradient_flows_to_queries_passages_negatives_and_tau():
    q = _unit(4, 8, seed=6).float().requires_grad_()
    p = _unit(4, 8, seed=7).float().requires_grad_()
    n = _unit(2, 8, seed=8).float().requires_grad_()
    tau = Temperature(0.05, learnable=True)
    loss = info_nce_loss(q, p, tau(), negatives=n, symmetric=True)
    loss.backward()
    for t in (q, p, n, tau.log_tau):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_temperature_fixed_learnable_and_clamped():
    fixed = Temperature(0.05)
    assert not any(True for _ in fixed.parameters())
    assert abs(fixed().item() - 0.05) < 1e-7
    learn = Temperature(0.05, learnable=True, min_value=0.02, max_value=0.1)
    assert [n for n, _ in learn.named_parameters()] == ["log_tau"]
    with torch.no_grad():
        learn.log_tau.fill_(-10.0)
    assert abs(learn().item() - 0.02) < 1e-7
    with torch.no_grad():
        learn.log_tau.fill_(5.0)
    assert abs(learn().item() - 0.1) < 1e-7
    # one optimiser step on a loss that prefers a sharper softmax lowers τ
    tau = Temperature(0.5, learnable=True)
    opt = torch.optim.SGD(tau.parameters(), lr=0.1)
    q = torch.eye(4)
    info_nce_loss(q, q, tau()).backward()
    opt.step()
    assert tau().item() < 0.5
    with pytest.raises(ValueError, match="min_temperature <= temperature"):
        Temperature(0.001, min_value=0.01)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="q and p"):
        info_nce_loss(torch.zeros(3, 4), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="negatives"):
        info_nce_loss(torch.zeros(3, 4), torch.zeros(3, 4), 0.1, negatives=torch.zeros(2, 5))


def test_no_process_group_gather_is_identity():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


# ---- 2 real gloo processes ------------------------------------------------------------------------

WORLD = 2
DIM = 8


def _global_inputs(sizes, neg_counts):
    n = sum(sizes)
    q = _unit(n, DIM, seed=10).float()
    p = _unit(n, DIM, seed=11).float()
    neg = _unit(max(sum(neg_counts), 1), DIM, seed=12).float()[: sum(neg_counts)]
    return q, p, neg


def _worker(rank: int, sizes: tuple[int, int], symmetric: bool, neg_counts, out_dir: str) -> None:
    torch.set_num_threads(1)
    # through a file of the test's folder: a free TCP port found first can be taken by another test's
    # process (pytest-xdist) before the group binds it
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=WORLD)
    try:
        q, p, neg = _global_inputs(sizes, neg_counts)
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        w = torch.nn.Parameter(torch.eye(DIM) + 0.01 * torch.arange(DIM * DIM).reshape(DIM, DIM) / DIM**2)
        q_loc, p_loc = q[sl] @ w, p[sl] @ w
        # hard negatives: any count per worker, none at all on some (an empty tensor: the gather still runs)
        neg_loc = neg[sum(neg_counts[:rank]) : sum(neg_counts[: rank + 1])] @ w
        loss = info_nce_loss(q_loc, p_loc, 0.1, negatives=neg_loc, symmetric=symmetric)
        loss.backward()
        # what DDP / DeepSpeed do: average the parameter gradients over workers
        grad = w.grad.clone()
        dist.all_reduce(grad)
        grad /= WORLD
        torch.save(
            {"loss": loss.detach(), "grad": grad, "n": sizes[rank]}, os.path.join(out_dir, f"r{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("sizes", "symmetric", "neg_counts"), [((4, 4), False, (2, 2)), ((3, 5), True, (3, 0)), ((4, 4), False, (0, 0))]
)
def test_gathered_loss_across_two_gloo_workers_equals_single_process(tmp_path, sizes, symmetric, neg_counts):
    args = (sizes, symmetric, neg_counts, str(tmp_path))
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]

    q, p, neg = _global_inputs(sizes, neg_counts)
    w = torch.nn.Parameter(torch.eye(DIM) + 0.01 * torch.arange(DIM * DIM).reshape(DIM, DIM) / DIM**2)
    # single process on the concatenated batch: per-query losses, candidates = all passages + all negatives
    qw, pw, nw = q @ w, p @ w, neg @ w
    per_query = F.cross_entropy(qw @ torch.cat([pw, nw]).T / 0.1, torch.arange(len(q)), reduction="none")
    if symmetric:
        per_query = (per_query + F.cross_entropy(pw @ qw.T / 0.1, torch.arange(len(q)), reduction="none")) / 2
    # each worker reports the mean over its own queries
    worker_means = [per_query[sum(sizes[:r]) : sum(sizes[: r + 1])].mean() for r in range(WORLD)]
    for res, want in zip(results, worker_means):
        torch.testing.assert_close(res["loss"], want, rtol=1e-5, atol=1e-6)
    if sizes[0] == sizes[1]:
        full = per_query.mean()  # the plain single-process loss on the concatenated batch
        torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, full, rtol=1e-5, atol=1e-6)
    else:
        full = sum(worker_means) / WORLD  # uneven batches: DDP's gradient average weights workers equally
    full.backward()
    for res in results:
        torch.testing.assert_close(res["grad"], w.grad, rtol=1e-5, atol=1e-6)
    assert w.grad.abs().sum() > 0
