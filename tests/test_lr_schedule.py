"""``optim.schedule`` does what it says on a real DeepSpeed engine: the lr each update uses, read from the
optimizer DeepSpeed steps. Before, ``linear`` without warm-up held lr constant (DeepSpeed's WarmupDecayLR
decays toward its warm-up floor, which was lr)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from one_rank import ONE_RANK

SCRIPT = ONE_RANK + r"""
from hbt_ray.train.config import DeepSpeedConfig, OptimConfig
from hbt_ray.train.deepspeed import build_optimizer, deepspeed_config

out = {}
for schedule, warmup, stage in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2)
    optim = OptimConfig(lr=0.01, warmup_steps=warmup, schedule=schedule, grad_clip=0.0, fused=False)
    ds = DeepSpeedConfig(zero_stage=stage, single_worker_stage=None)
    engine, *_ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, optim),
                                      config=deepspeed_config(optim, ds, 6, 2, 1), dist_init_required=False)
    lrs = []
    for _ in range(6):
        lrs.append(engine.get_lr()[0])  # what this update steps with
        engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
        engine.step()
    out[f"{schedule}/{warmup}/{stage}"] = lrs
    if schedule == "linear" and warmup == 0 and stage == 0:  # resumed from a checkpoint after 3 updates
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 2)
        first, *_ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, optim),
                                         config=deepspeed_config(optim, ds, 6, 2, 1), dist_init_required=False)
        resumed = []
        for _ in range(3):
            resumed.append(first.get_lr()[0])
            first.backward(first(torch.randn(2, 4)).pow(2).mean())
            first.step()
        first.save_checkpoint(sys.argv[2], tag="t")
        module = torch.nn.Linear(4, 2)
        second, *_ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, optim),
                                          config=deepspeed_config(optim, ds, 6, 2, 1), dist_init_required=False)
        second.load_checkpoint(sys.argv[2], tag="t")
        for _ in range(3):
            resumed.append(second.get_lr()[0])
            second.backward(second(torch.randn(2, 4)).pow(2).mean())
            second.step()
        out["linear/0/0/resumed"] = resumed
print("REPORT " + json.dumps(out))
"""


def test_each_schedule_gives_the_updates_its_lr(tmp_path):
    cases = [("linear", 0, 0), ("linear", 0, 2), ("constant", 0, 0), ("cosine", 0, 0), ("linear", 3, 0)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases), str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=600, cwd=root)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    lrs = json.loads(lines[-1].removeprefix("REPORT "))
    lr = 0.01
    # linear, no warm-up: the first updates at lr, then down by lr/(T-1) per update, the last above 0
    expected = [lr, lr, lr * 4 / 5, lr * 3 / 5, lr * 2 / 5, lr * 1 / 5]
    assert lrs["linear/0/0"] == pytest.approx(expected) and lrs["linear/0/2"] == pytest.approx(expected)
    assert lrs["linear/0/0/resumed"] == pytest.approx(expected)  # a resumed run continues the schedule
    assert lrs["constant/0/0"] == pytest.approx([lr] * 6)
    cosine = lrs["cosine/0/0"]
    assert cosine[0] == pytest.approx(lr) and all(a > b for a, b in zip(cosine[1:], cosine[2:])) and cosine[-1] > 0
    # with warm-up: DeepSpeed's own, from 0 up to lr, then the decay
    warm = lrs["linear/3/0"]
    assert warm[0] == 0 and max(warm) == pytest.approx(lr) and warm[-1] < max(warm)
