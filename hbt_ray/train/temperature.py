"""τ in fp32 under mixed precision.

DeepSpeed casts every parameter it owns to the training dtype: a learnable ``log τ`` in bf16 moves only
in steps of about 1.6 % of τ (0.05 is held as 0.0498), and a release that also casts buffers would round a
fixed τ of 0.01 to 0.0101. Under ``precision: bf16`` / ``fp16`` the trainer therefore builds the
:class:`~hbt_ray.loss.ContrastiveModule` with its temperature outside the module's registered children
(``fp32_temperature``), so DeepSpeed never sees it, and a learnable one is stepped here: its own fp32
AdamW at each optimizer step, with the gradient averaged over the workers as DeepSpeed averages the
encoder's, unscaled from fp16's loss scale, at the learning rate DeepSpeed's schedule gives that step.
It is not part of the encoder's gradient-norm clipping (a scalar, clamped to its own range instead).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hbt_ray.loss import Temperature
from hbt_ray.train.config import OptimConfig


class TemperatureStepper:
    """The fp32 optimizer of a learnable temperature kept out of DeepSpeed.

    >>> tau = Temperature(0.05, learnable=True)
    >>> stepper = TemperatureStepper(tau, OptimConfig(lr=0.1, warmup_steps=0), torch.device("cpu"))
    >>> (tau() * 2.0).sum().backward()   # a loss that wants τ smaller
    >>> stepper.step(lr=0.1, loss_scale=1.0)
    >>> float(tau()) < 0.05, tau.log_tau.dtype
    (True, torch.float32)
    """

    def __init__(self, temperature: Temperature, optim: OptimConfig, device: torch.device) -> None:
        temperature.to(device)
        self.temperature = temperature
        self.param = temperature.log_tau
        self.optimizer = torch.optim.AdamW(
            [self.param], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=0.0
        )

    def step(self, lr: float, loss_scale: float) -> None:
        """One update from the gradient the step's backward passes left (then cleared)."""
        grad = self.param.grad
        if grad is None:  # not in this step's graph
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grad)
            grad.div_(dist.get_world_size())
        if loss_scale != 1.0:
            grad.div_(loss_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON: τ's value and its AdamW moments (checkpointed with the trainer state)."""
        state = self.optimizer.state.get(self.param, {})
        return {
            "log_tau": self.param.detach().cpu().tolist(),
            "adam": {k: (v.detach().cpu().tolist() if torch.is_tensor(v) else v) for k, v in state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.param.copy_(torch.tensor(state["log_tau"], dtype=torch.float32))
        if state.get("adam"):
            device = self.param.device
            self.optimizer.state[self.param] = {
                k: torch.tensor(v, dtype=torch.float32, device=device if k != "step" else "cpu")
                for k, v in state["adam"].items()
            }


def training_dtype_keeps_fp32_temperature(precision: str) -> bool:
    """Whether the temperature stays out of DeepSpeed (see the module docstring).

    >>> training_dtype_keeps_fp32_temperature("bf16"), training_dtype_keeps_fp32_temperature("fp32")
    (True, False)
    """
    return precision != "fp32"
