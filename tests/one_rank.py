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

# the group through a file: the port above (for DeepSpeed's environment checks) is never bound, so
# another test's process (pytest-xdist) taking it in the meantime does no harm
import tempfile
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "pg"), rank=0, world_size=1)
import deepspeed
"""
