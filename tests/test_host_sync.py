"""The training step's hot path never makes the host wait for the GPU (issue 30), checked on a CPU machine.

A host sync is an op whose result the host must read before it can go on: a data-dependent shape
(``nonzero``, ``bincount``) or a read (``item``, ``float``, ``tolist``) of a value computed on the device
or exchanged over its NCCL group. Two checks stand in for a GPU profile:

- the forward runs on the **meta** device, which has shapes and no values: anything data-dependent
  fails there;
- in two real gloo processes whose default group plays NCCL, every tensor that went through that group
  is watched, and reading one on the host fails the test; what the host knows itself (row counts, the
  token deal, the step's mix) must travel on :func:`hbt_ray.loss.host_group`.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hbt_ray.loss import ContrastiveModule, LossConfig, row_lengths
from hbt_ray.model import ModelConfig, load_dual_encoder
from hbt_ray.model.packed import packed_hidden_states

TEXTS = ["a b c d", "e f", "g h i", "j k l m n", "o p"]


def _tiny_on_meta():
    encoder = load_dual_encoder(ModelConfig(name="tiny"), train_texts=TEXTS)
    assert encoder.packed
    return encoder.to("meta")


def _tokenized(encoder, texts, kind):
    tok = encoder.tokenize(texts, kind)
    return tok["input_ids"], tok["attention_mask"]


def test_the_training_forward_runs_on_the_meta_device_with_lengths_counted_on_the_host():
    encoder = _tiny_on_meta()
    module = ContrastiveModule(encoder, LossConfig(temperature=0.05, learnable_temperature=True, gather=False))
    module.to("meta")
    q_ids, q_mask = _tokenized(encoder, TEXTS[:3], "query")
    p_ids, p_mask = _tokenized(encoder, TEXTS[2:], "passage")
    n_ids, n_mask = _tokenized(encoder, TEXTS[:2], "passage")
    lengths = row_lengths(q_mask, p_mask, n_mask)  # what the trainer counts before the copy to the GPU
    on_meta = [t.to("meta") for t in (q_ids, q_mask, p_ids, p_mask, n_ids, n_mask)]
    loss, tau = module(*on_meta, lengths=lengths)
    assert loss.device.type == "meta" and loss.shape == torch.Size([])
    loss.backward()  # the backward, gradient checkpointing aside, is the forward's ops transposed
    assert encoder.backbone.embeddings.word_embeddings.weight.grad is not None
    # the same forward without the host's counts has to ask the device (here: cannot)
    with pytest.raises(NotImplementedError, match="nonzero"):
        module(*on_meta)


def test_packed_hidden_states_with_gradient_checkpointing_run_on_the_meta_device():
    encoder = _tiny_on_meta()
    encoder.train()
    ids, mask = _tokenized(encoder, TEXTS, "passage")
    hidden, rows = packed_hidden_states(encoder.backbone, ids.to("meta"), mask.to("meta"), checkpointing=True,
                                        tokens=int(mask.sum()))  # fmt: skip
    assert hidden.shape[0] == rows.shape[0] == int(mask.sum())
    hidden.sum().backward()


# ---- two gloo processes; the default group plays the GPU's NCCL group --------------------------------

WORLD = 2


class DeviceReads:
    """Watches the default group's collectives; a host read of any tensor that went through one raises."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []  # kept alive, so that no other tensor reuses their memory
        self.storages: set[int] = set()

    def install(self) -> None:
        for name in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter"):
            setattr(dist, name, self._watched(getattr(dist, name)))
        plain_gather_object = dist.all_gather_object

        def gather_object(out, obj, group=None):
            if group is None:
                raise AssertionError("all_gather_object over the device's group (its result is read on the host)")
            return plain_gather_object(out, obj, group=group)

        dist.all_gather_object = gather_object
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
            setattr(torch.Tensor, name, self._guarded(getattr(torch.Tensor, name), name))
        plain_backend = dist.get_backend
        dist.get_backend = lambda group=None: "nccl" if group is None else plain_backend(group)

    def _watched(self, collective):
        def run(*args, group=None, **kwargs):
            out = collective(*args, group=group, **kwargs)
            if group is None:
                for arg in args:
                    for t in arg if isinstance(arg, (list, tuple)) else [arg]:
                        if torch.is_tensor(t):
                            self.kept.append(t)
                            self.storages.add(t.untyped_storage().data_ptr())
            return out

        return run

    def _guarded(self, read, name):
        watch = self

        def guarded(tensor, *args, **kwargs):
            if watch.storages and tensor.untyped_storage().data_ptr() in watch.storages:
                raise AssertionError(f"host read ({name}) of a tensor that went through the device's group")
            return read(tensor, *args, **kwargs)

        return guarded


def _worker(rank: int, out_dir: str) -> None:
    from hbt_ray.loss import info_nce_loss
    from hbt_ray.train.batches import all_reduce_mean, deal_by_tokens

    torch.set_num_threads(1)
    _init_group(rank, out_dir)
    try:
        encoder = load_dual_encoder(ModelConfig(name="tiny"), train_texts=TEXTS)
        DeviceReads().install()
        torch.manual_seed(rank)
        n = (3, 5)[rank]  # uneven batches, hard negatives on one rank only
        q, p = torch.randn(n, 8, requires_grad=True), torch.randn(n, 8, requires_grad=True)
        negatives = torch.randn(2 * (1 - rank), 8, requires_grad=True)
        loss = info_nce_loss(q, p, 0.05, negatives=negatives, symmetric=True)
        loss.backward()
        q_ids, q_mask = _tokenized(encoder, TEXTS[: rank + 2], "query")
        p_ids, p_mask = _tokenized(encoder, TEXTS[rank:][:2 + rank], "passage")
        dealt, tokens = deal_by_tokens((q_ids, q_mask, p_ids, p_mask, None, None, [0] * len(q_ids)), encoder.tokenizer)
        means = all_reduce_mean([float(len(dealt[0])), 1.0], host=True)
        with open(os.path.join(out_dir, f"r{rank}.txt"), "w") as f:
            f.write(f"ok {len(dealt[0])} {sum(tokens)} {means}")
    except BaseException as err:
        with open(os.path.join(out_dir, f"r{rank}.txt"), "w") as f:
            f.write(f"{type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()


def _init_group(rank: int, out_dir: str) -> None:
    """The gloo group through a file of the test's folder: a free TCP port found first can be taken by
    another test's process (pytest-xdist) before the group binds it."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=WORLD)


def test_the_loss_and_the_token_deal_read_nothing_that_went_through_the_devices_group(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [(tmp_path / f"r{r}.txt").read_text() for r in range(WORLD)]
    assert all(r.startswith("ok") for r in results), results
    assert [r.split()[1] for r in results] == ["2", "3"]  # each rank keeps as many pairs as it drew


def test_the_watch_catches_a_host_read_of_a_gathered_value(tmp_path):
    """The check above can fail: the same watch on a read of the device group's result."""
    mp.spawn(_read_gathered, args=(str(tmp_path),), nprocs=WORLD, join=True)
    assert "host read (item)" in (tmp_path / "r0.txt").read_text()


def _read_gathered(rank: int, out_dir: str) -> None:
    _init_group(rank, out_dir)
    try:
        DeviceReads().install()
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
        dist.all_gather(sizes, torch.tensor([rank + 3]))
        message = f"read {[s.item() for s in sizes]}"
    except AssertionError as err:
        message = str(err)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"r{rank}.txt"), "w") as f:
        f.write(message)
