"""The CUDA / mixed-precision paths, checked on a CPU machine (issue 30): what a GPU node would run, with
``torch.cuda`` mocked where the path only asks it questions."""

from __future__ import annotations

import pytest
import torch
from one_rank import ONE_RANK

from hbt_ray.train.checkpoint import rng_state, set_rng_state


class FakeCuda:
    """``torch.cuda`` as a worker sees it on a node: ``visible`` devices, this worker's is ``current``."""

    def __init__(self, visible: int, current: int) -> None:
        self.visible, self.current = visible, current
        self.states = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(visible)}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", self.get)
        monkeypatch.setattr(cuda, "set_rng_state", self.set)
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.states[d] for d in range(self.visible)])
        monkeypatch.setattr(cuda, "set_rng_state_all", lambda states: [self.set(s, d) for d, s in enumerate(states)])

    def _index(self, device: int | str | torch.device = "cuda") -> int:
        if isinstance(device, int):
            index = device
        else:
            index = torch.device(device).index
            index = self.current if index is None else index
        if not 0 <= index < self.visible:
            raise IndexError(f"CUDA device {index} of {self.visible} visible")
        return index

    def get(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        self.states[self._index(device)] = state.clone()


def test_a_resumed_rank_restores_its_own_device_rng_on_a_node_with_fewer_gpus(monkeypatch):
    """Saved on a node where the rank saw 8 GPUs (Ray shares CUDA_VISIBLE_DEVICES among a node's workers),
    restored after a preemption on a node where it sees 4: the rank's own state comes back, nothing else
    is touched, and nothing raises."""
    before = FakeCuda(visible=8, current=6)
    before.states[6] = torch.arange(16, dtype=torch.uint8)
    before.install(monkeypatch)
    saved = rng_state()
    assert saved["cuda_device"] == list(range(16))  # this worker's device only
    assert "cuda" not in saved

    after = FakeCuda(visible=4, current=2)
    after.install(monkeypatch)
    set_rng_state(saved)
    assert after.states[2].tolist() == list(range(16))
    assert [after.states[d].tolist() for d in (0, 1, 3)] == [[d] * 16 for d in (0, 1, 3)]

    # a save from before this fix (every visible device's state): the rank takes its own, or none
    legacy = {**saved, "cuda": [[d] * 16 for d in range(8)]}
    del legacy["cuda_device"]
    set_rng_state(legacy)
    assert after.states[2].tolist() == [2] * 16
    set_rng_state({**legacy, "cuda": legacy["cuda"][:2]})  # fewer saved than this rank's index: skipped
    assert after.states[2].tolist() == [2] * 16


def test_an_encoder_actor_uses_the_device_its_pool_reserved_not_any_it_can_see(monkeypatch, tmp_path):
    """Ray leaves a node's GPUs visible to an actor that reserved none: such an actor stays on the CPU
    (before, it took GPU 0 beside the training ranks); the pool's GPU request decides the device."""
    import ray

    from hbt_ray.evaluate import encode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as the actor sees it
    actor = encode.EncoderActor("tiny", batch_size=4)
    assert next(actor.encoder.parameters()).device.type == "cpu"
    out = actor({"row": [0, 1], "text": ["a b", "c"], "kind": ["query", "passage"]})
    assert out["embedding"].shape[0] == 2

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for gpus_in_cluster, expected in ((0, (0.0, 1.0, "cpu")), (8, (1.0, 0.0, "cuda"))):
        monkeypatch.setattr(ray, "cluster_resources", lambda g=gpus_in_cluster: {"CPU": 16.0, "GPU": float(g)})
        assert encode.actor_resources(None, 1.0) == expected
    assert encode.actor_resources(0.5, 1.0) == (0.5, 0.0, "cuda")  # asked for: reserved and used
    assert encode.actor_resources(0.0, 2.0) == (0.0, 2.0, "cpu")


MIXED_PRECISION_SCRIPT = ONE_RANK + r'''from deepspeed.utils import safe_get_full_fp32_param

from hbt_ray.loss import ContrastiveModule, LossConfig
from hbt_ray.model import ModelConfig, load_dual_encoder
from hbt_ray.train.config import DeepSpeedConfig, OptimConfig
from hbt_ray.train.deepspeed import build_optimizer, consolidated_state_dict, deepspeed_config
from hbt_ray.train.temperature import TemperatureStepper

stage, cache_dir = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
encoder = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))
module = ContrastiveModule(encoder, LossConfig(temperature=0.05, learnable_temperature=True, gather=False),
                           fp32_temperature=True)
optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
tau_stepper = TemperatureStepper(module.temperature, optim, torch.device("cpu"))
ds = DeepSpeedConfig(zero_stage=stage, precision="bf16", single_worker_stage=None)
engine, *_ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, optim),
                                  config=deepspeed_config(optim, ds, 10, 4, 1), dist_init_required=False)
q = encoder.tokenize([f"query {i} about {i * 3}" for i in range(4)], "query")
p = encoder.tokenize([f"passage {i} answers {i * 3} in words" for i in range(4)], "passage")
for _ in range(3):
    lr = engine.get_lr()[0]
    loss, tau = engine(q["input_ids"], q["attention_mask"], p["input_ids"], p["attention_mask"], None, None)
    engine.backward(loss)
    engine.step()
    tau_stepper.step(lr, 1.0)
state = consolidated_state_dict(engine)
masters, module_copy = {}, {}
for name, param in engine.module.encoder.named_parameters():
    masters[name] = safe_get_full_fp32_param(param).float()
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
    for name, param in engine.module.encoder.named_parameters():
        module_copy[name] = param.detach().clone()
    log_tau = engine.module.temperature.log_tau.detach().clone()
report = {
    "export_dtypes": sorted({str(state[n].dtype) for n in masters}),
    "module_dtypes": sorted({str(v.dtype) for v in module_copy.values()}),
    "export_equals_master": all(torch.equal(state[n], masters[n]) for n in masters),
    "module_differs_from_master": any(not torch.equal(module_copy[n].float(), masters[n]) for n in masters),
    "tau_dtype": str(log_tau.dtype),
    "tau_forward_dtype": str(tau.dtype),
    "tau": float(engine.module.temperature()),
    "tau_owned_by_deepspeed": any(p is engine.module.temperature.log_tau for p in engine.module.parameters()),
}
print("REPORT " + json.dumps(report))
'''


@pytest.mark.parametrize("stage", [2, 3])
def test_a_bf16_export_holds_the_fp32_master_weights(tmp_path, stage):
    """Under ``precision: bf16`` the module's weights are the bf16 copy the forward uses; DeepSpeed keeps
    fp32 masters (ZeRO 2: partitioned; ZeRO 3: partitioned and gathered). The export is the masters, so a
    GPU-trained model is as exact as a CPU-trained one (before: the rounded bf16 copy)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", MIXED_PRECISION_SCRIPT, str(stage), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600, cwd=root)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["module_dtypes"] == ["torch.bfloat16"]  # the run really was bf16
    assert report["module_differs_from_master"]  # so which copy is exported matters
    assert report["export_dtypes"] == ["torch.float32"] and report["export_equals_master"], report
    # τ kept in fp32, out of DeepSpeed's hands, and learning in steps finer than bf16's (0.05 is 0.0498 there)
    assert report["tau_dtype"] == report["tau_forward_dtype"] == "torch.float32", report
    assert not report["tau_owned_by_deepspeed"]
    assert report["tau"] != 0.05 and abs(report["tau"] - 0.05) < 1e-3 * 0.05 * 3 + 1e-9, report


def test_on_gpu_offload_is_pinned_reductions_overlap_and_fp32_matmuls_use_tf32():
    from hbt_ray.train.config import DeepSpeedConfig, OptimConfig
    from hbt_ray.train.deepspeed import deepspeed_config, enable_tf32

    offload = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True)
    for on_gpu in (True, False):
        zero = deepspeed_config(OptimConfig(), offload, 10, 8, 2, on_gpu=on_gpu)["zero_optimization"]
        assert zero["offload_optimizer"]["pin_memory"] is on_gpu and zero["offload_param"]["pin_memory"] is on_gpu
        assert zero["overlap_comm"] is on_gpu
    assert "overlap_comm" not in deepspeed_config(OptimConfig(), DeepSpeedConfig(zero_stage=1), 10, 8, 2,
                                                  on_gpu=True)["zero_optimization"]  # fmt: skip

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # (settable properties of torch's backend modules: set and restored by hand)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert not enable_tf32(torch.device("cpu")) and not torch.backends.cuda.matmul.allow_tf32
        assert enable_tf32(torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_batches_for_a_gpu_are_made_in_pinned_memory(monkeypatch, tmp_path):
    """``non_blocking=True`` copies are asynchronous only from page-locked memory: the prefetch thread
    pins every tensor of a batch meant for a GPU (and none of one for a CPU worker)."""
    from hbt_ray.model import ModelConfig, load_dual_encoder
    from hbt_ray.sampler import Batch
    from hbt_ray.train.batches import batch_preparer

    pinned: list[tuple[int, ...]] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(tuple(t.shape)) or t)
    encoder = load_dual_encoder(ModelConfig(name="tiny", cache_dir=str(tmp_path)), train_texts=["a b c", "d e"])
    batch = Batch(step=0, epoch=0, strategy="x-y", lang=None, queries=["a b", "c"], passages=["d e", "a"],
                  negatives=[["e d"], []], query_langs=["en", "en"], passage_langs=["de", "de"], group_ids=["1", "2"])
    batch_preparer(encoder, hard_negatives=True)(batch)
    assert pinned == []
    prepared = batch_preparer(encoder, hard_negatives=True, pin=True)(batch)
    assert len(pinned) == 6 and sorted(pinned) == sorted(tuple(t.shape) for t in prepared[:6])


CPU_ADAM_SCRIPT = ONE_RANK + r'''from deepspeed.ops.adam import DeepSpeedCPUAdam

from hbt_ray.train.config import DeepSpeedConfig, OptimConfig
from hbt_ray.train.deepspeed import build_optimizer, deepspeed_config


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


optim = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.0, warmup_steps=0, schedule="constant")
offload = DeepSpeedConfig(zero_stage=2, offload_optimizer=True, single_worker_stage=None)
config = deepspeed_config(optim, offload, 10, 4, 1)
module, reference = tiny(), tiny()
start = {k: v.detach().clone() for k, v in module.state_dict().items()}
optimizer = build_optimizer(module, optim, offload)
engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
torch_adamw = build_optimizer(reference, optim)  # the same groups, torch's AdamW
xs = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
for x in xs:
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    reference(x).pow(2).mean().backward()
    torch_adamw.step()
    torch_adamw.zero_grad()
trained, expected = module.state_dict(), reference.state_dict()
try:  # the same config refuses a torch AdamW under offload
    deepspeed.initialize(model=tiny(), optimizer=build_optimizer(tiny(), optim), config=config,
                         dist_init_required=False)
    refused = ""
except Exception as exc:
    refused = str(exc)
report = {
    "optimizer": type(optimizer).__name__,
    "is_ds_cpu_adam": isinstance(optimizer, DeepSpeedCPUAdam),
    "engine_steps_it": engine.optimizer.optimizer is optimizer,
    "group_decays": [g["weight_decay"] for g in optimizer.param_groups],
    "max_diff": max(float((trained[k] - expected[k]).abs().max()) for k in expected),
    "min_moved": min(float((trained[k] - start[k]).abs().max()) for k in start),
    "refused": refused,
}
print("REPORT " + json.dumps(report))
'''


def test_offloaded_optimizer_is_deepspeeds_cpu_adam_and_steps_like_torch_adamw(tmp_path):
    """ZeRO-Offload steps the optimizer on the host: ``build_optimizer`` gives DeepSpeed's C++ CPU AdamW
    there (built by DeepSpeed's CPU accelerator here, as on a GPU node), with the same groups (no decay on
    biases and norms); a real ZeRO-2 + offload engine steps it, landing where torch's AdamW does; DeepSpeed
    is told to refuse any other optimizer there. Without offload, and with ``offload_param`` alone (the
    masters stay on the device), torch's AdamW as before."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from hbt_ray.train.config import DeepSpeedConfig, OptimConfig
    from hbt_ray.train.deepspeed import build_optimizer, deepspeed_config

    layer = torch.nn.Linear(2, 2)
    for ds in (DeepSpeedConfig(), DeepSpeedConfig(zero_stage=3, offload_param=True), None):
        assert type(build_optimizer(layer, OptimConfig(), ds)) is torch.optim.AdamW
        if ds is not None:
            assert deepspeed_config(OptimConfig(), ds, 10, 8, 2)["zero_force_ds_cpu_optimizer"] is False
    offload = DeepSpeedConfig(offload_optimizer=True)
    assert deepspeed_config(OptimConfig(), offload, 10, 8, 2)["zero_force_ds_cpu_optimizer"] is True

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CPU_ADAM_SCRIPT], capture_output=True, text=True, timeout=600,
                          cwd=root)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["optimizer"] == "DeepSpeedCPUAdam" and report["is_ds_cpu_adam"], report
    assert report["engine_steps_it"] and report["group_decays"] == [0.1, 0.0], report
    assert report["min_moved"] > 1e-3, report  # every tensor really moved (3 steps at lr 1e-2)
    assert report["max_diff"] < 1e-5, report
    assert "DeepSpeedCPUAdam" in report["refused"], report
