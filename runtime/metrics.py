"""What a step reports: metrics.jsonl and TensorBoard scalars (rank 0), peak memory, MFU, and the
step's wall and device time."""

import json
import os
import resource
import time

import torch

from compiler.profiles import ProfileError, load_profile

SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "mfu")
# record key -> TensorBoard tag, for what is not a training scalar (`train/<key>`)
OTHER_SCALARS = {"eval_loss": "eval/loss"}


class MetricsLog:
    """metrics.jsonl (one JSON object per step; `eval_loss` in the steps that evaluated) and
    TensorBoard scalars (train/*, eval/loss), written by rank 0 only."""

    def __init__(self, save_dir, enabled):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        self.path = os.path.join(save_dir, "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(save_dir, "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.writer = None

    def log(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            tags = {**{key: f"train/{key}" for key in SCALARS}, **OTHER_SCALARS}
            for key, tag in tags.items():
                if key in record:
                    self.writer.add_scalar(tag, record[key], record["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class StepTimer:
    """Wall time of a step and, on a GPU, the device's own time between its start and end."""

    def __init__(self, device):
        self.device = device
        self.started = time.perf_counter()
        self.events = None
        if device.type == "cuda":
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.events[0].record()

    def stop(self):
        """{"step_time_s"} and, on a GPU, {"step_time_cuda_s"} (waits for the device)."""
        times = {}
        if self.events is not None:
            self.events[1].record()
            torch.cuda.synchronize(self.device)
        times["step_time_s"] = time.perf_counter() - self.started
        if self.events is not None:
            times["step_time_cuda_s"] = self.events[0].elapsed_time(self.events[1]) / 1e3
        return times


def peak_memory_gib(device):
    """This process's peak memory so far: allocated device memory on a GPU; on a CPU the resident
    set's high-water mark (which also counts the interpreter and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resident_high_water_kib() / 2 ** 20


def resident_high_water_kib():
    """VmHWM of /proc/self/status: this program's own peak. getrusage's ru_maxrss is no substitute on
    Linux: it keeps the high-water mark of the process before it exec'd, so a worker started from a
    large parent (a launcher, a test runner) reports the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; elsewhere the best there is


def model_flops_per_step(plan):
    """The FLOPs of one step of the whole run. The plan's are those of one replica's share of the
    global batch at the replica count it was compiled for; the global batch (and so the step's FLOPs)
    is the same at any replica count. For a LoRA plan they are full training's FLOPs all the same
    (the benchmarks' one MFU definition: the frozen weights' skipped gradients counted), so a LoRA
    run's MFU is the rate of the model's training FLOPs, not of the fewer it executes."""
    planned_replicas = plan.search_inputs.get("runtime_ngpus", plan.plan_ngpus) // plan.plan_ngpus
    return plan.predicted.get("model_flops_per_step", 0.0) * planned_replicas


def peak_flops(plan):
    """The device profile's peak bf16 FLOP/s, the MFU denominator (0 when the profile is gone)."""
    try:
        return load_profile(plan.search_inputs["device_profile"]).peak_bf16_tflops * 1e12
    except ProfileError:  # MFU is informational: a plan whose profile file moved still runs
        return 0.0
