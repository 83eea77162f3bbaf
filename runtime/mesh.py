"""The device mesh of a run: the plan's axes (pp, dp, ep, tp) under an outer `replica` axis.

runtime_ngpus = replicas x plan_ngpus; rank r is device r % plan_ngpus of replica r // plan_ngpus,
so the mesh is laid out row-major as (replica, pp, dp, ep, tp), exactly the plan's device order
within each replica.
"""

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from compiler.plan import MESH_AXES

AXES = ("replica",) + MESH_AXES


@dataclass
class RunMesh:
    mesh: DeviceMesh
    replicas: int
    sizes: dict          # axis -> size, replica included
    flattened: dict = field(default_factory=dict)  # name -> 1-D mesh over several axes, made once

    def coord(self, axis):
        return self.mesh.get_local_rank(axis)

    def group(self, axis):
        return self.mesh.get_group(axis)

    def data_mesh(self):
        """Ranks that see different data and hold the same dense parameters: replica x dp x ep."""
        return self._flat(("replica", "dp", "ep"), "data")

    def expert_data_mesh(self):
        """Ranks that hold the same experts: replica x dp (ep splits the experts themselves)."""
        return self._flat(("replica", "dp"), "expert_data")

    def data_rank(self):
        """This rank's index among the data-parallel ranks (which slice of the global batch it reads)."""
        r, d, e = self.coord("replica"), self.coord("dp"), self.coord("ep")
        return (r * self.sizes["dp"] + d) * self.sizes["ep"] + e

    def data_ranks(self):
        return self.sizes["replica"] * self.sizes["dp"] * self.sizes["ep"]

    def _flat(self, axes, name):
        if name not in self.flattened:
            self.flattened[name] = self.mesh[axes]._flatten(name)
        return self.flattened[name]


def build_mesh(plan, device_type):
    world = dist.get_world_size()
    replicas = world // plan.plan_ngpus
    sizes = {"replica": replicas, **plan.mesh}
    mesh = init_device_mesh(device_type, tuple(sizes[a] for a in AXES), mesh_dim_names=AXES)
    return RunMesh(mesh=mesh, replicas=replicas, sizes=sizes)


# ---- the process group ---------------------------------------------------------------------------------
def init_distributed(device):
    """The default process group: NCCL for cuda, gloo for cpu; a plain `python train.py` (no torchrun)
    is a world of one."""
    if dist.is_initialized():
        return
    tie_to_launcher()
    backend = "nccl" if device == "cuda" else "gloo"
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)


def free_port():
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous on this host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_identity():
    """(node rank, hostname) of this process, for messages that must say which machine is at fault.
    The node rank is torchrun's GROUP_RANK: the node's index in the rendezvous. With
    `--rdzv_backend c10d` torchrun assigns it itself (ignoring `--node_rank`), so the hostname is
    named too; a process not started by torchrun is node 0."""
    return int(os.environ.get("GROUP_RANK", "0")), socket.gethostname()


# ---- dying with the launcher ------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_SECONDS = 1.0


def tie_to_launcher():
    """Under torchrun, this worker dies when its launcher does. torchrun starts each worker in a
    session of its own (so a kill of the launcher's process group or a closed terminal does not
    reach it) and is the worker's parent: without this a killed torchrun leaves its workers training
    and moving `last`. On Linux the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG);
    everywhere, a daemon thread does the same within WATCH_SECONDS when the parent pid changes. A
    plain `python train.py` (no torchrun) is left alone: it may be meant to outlive its shell."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still applies
    if os.getppid() != launcher:  # the launcher died while the tie was being made
        os.kill(os.getpid(), signal.SIGKILL)

    def watch():
        while True:
            time.sleep(WATCH_SECONDS)
            if os.getppid() != launcher:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
