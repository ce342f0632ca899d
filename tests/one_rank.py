"""The opening of a child-process script that runs DeepSpeed as one gloo rank on the CPU (a free port, the
process group, ``import torch`` / ``deepspeed``): tests run engines in a fresh process so that DeepSpeed's
global state never leaks between them."""

ONE_RANK = r"""
import json, os, socket, sys

os.environ["DS_ACCELERATOR"] = "cpu"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  LOCAL_WORLD_SIZE="1")
import torch
import torch.distributed as dist

dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
"""
