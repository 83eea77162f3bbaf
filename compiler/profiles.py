"""Device profiles: what the cost model knows about one kind of device, read from a JSON file.

A profile turns work into time: a GEMM of given shape, a grouped GEMM over the experts, a
memory-bound kernel that moves some bytes, a collective over a group of devices. It also holds the
memory capacity (the planner's memory limit) and the datasheet peak (the MFU denominator).

    profile = load_profile("h100")            # compiler/profiles/h100.json
    profile = load_profile("my_gpu.json")     # any file in the format below
    profile.matmul_time(4096, 2048, 2048)     # seconds

Profiles are written by ``bench/profile_device.py``, which measures them on the device it runs on.
Every number says where it came from in ``sources``: measured (where, when), a vendor figure, an
estimate, or copied from another profile.

JSON format (``schema_version`` 1)::

    {
      "schema_version": 1,
      "name": "h100",                           # short name, also the file name of shipped ones
      "device_name": "NVIDIA H100 80GB HBM3",   # as torch.cuda.get_device_name() says
      "memory_gib": 79.0,                       # memory one process can allocate, GiB
      "peak_bf16_tflops": 989.0,                # datasheet dense bf16 peak: the MFU denominator
      "kernel_launch_us": 5.0,                  # host time per kernel (PyTorch eager op), us
      "memory_bandwidth_gbps": 3000.0,          # device-to-device copy: (read + written) bytes/s / 1e9
      "matmul": {                               # per dtype, [GEMM FLOPs (2mnk), TFLOP/s] points
        "bf16": [[1.1e12, 790.0], ...]
      },
      "grouped_gemm": {                         # per dtype, [rows per expert, TFLOP/s] points
        "bf16": [[384, 500.0], [1536, 670.0]]
      },
      "collectives": {                          # op -> group size -> NCCL-convention figures
        "all_reduce": {"2": {"bus_bandwidth_gbps": 329.0, "latency_us": 20.0}, ...},
        "all_gather": {...}, "reduce_scatter": {...}, "all_to_all": {...}
      },
      "sources": {                              # field -> {"kind": ..., "note": ...}
        "matmul": {"kind": "measured", "note": "torch.mm, CUDA events, median, 2026-11-28"},
        ...
      }
    }

Curves are lists of ``[x, y]`` pairs with x strictly increasing; between points the value is
interpolated linearly in log(x)-log(y) (throughput curves are close to straight lines there), and
outside the measured range it is clamped to the nearest end point. The grouped-GEMM curve is
measured with 64 experts at the two expert shapes of the DeepSeek MoE models (n=2816, k=2048 and
n=2048, k=1408) and is used for any shape, keyed by rows per expert only.

Curves are keyed by dtype ('bf16', 'fp16', 'fp32'); the cost model asks for bf16 unless told
otherwise, so every profile has a bf16 curve (the CPU profile also has fp32, which a CPU runs much
faster). A collective entry may carry an optional ``"points"`` list of ``[bytes, bus GB/s]``
pairs, the raw measurements behind it; the model below does not use them.

Optional fields (absent: the cost model assumes what the comment says):

    "attention": {                            # per attention option (options.ExecutionOptions.attention):
      "kernels": {                            # [kernel FLOPs of one call, TFLOP/s] points, forward + backward
        "sdpa": [[5.15e11, 286.0]], ...       # (the FLOPs convention is below); a kernel not listed cannot
      },                                      # be chosen (no attention at all: the GEMM curve prices it)
      "sdpa_picks": "cudnn",                  # what PyTorch's own choice runs for causal MLA heads here (a note)
      "masked": "sdpa_efficient"              # the kernel SDPA runs with an explicit (block-causal) mask
    },
    "host_sync_us": 30.0,                     # a device-to-host copy that waits for the stream (absent: 0)
    "expert_load_imbalance": {"2": 1.1, ...}  # busiest / mean expert rank's slots, by ep (absent: 1.0)

An attention curve's x is the FLOPs one forward and backward call computes with causal skipping, the
benchmark's convention (bench/train_step.py): 3 x B x H x S^2 x (d_qk + d_v), as a causal query sees
S / 2 keys, q.k costs 2 d_qk and p.v 2 d_v FLOPs per key, and the backward twice the forward; d_v is
the kernel's own value width (padded to d_qk by sdpa_flash_padded and flash on MLA's heads). With an
explicit mask nothing is skipped: twice those FLOPs, at the `masked` kernel's throughput.

``sources`` needs an entry for each number-bearing field (``memory_gib``, ``peak_bf16_tflops``,
``kernel_launch_us``, ``memory_bandwidth_gbps``, ``matmul``, ``grouped_gemm``, ``collectives``);
more keys may be added: ``"profile"`` (the whole file: e.g. a placeholder), or a finer one such as
``"collectives.all_to_all"``. Each entry is ``{"kind": ..., "note": ...}`` with kind one of
measured, vendor, estimate, copied, placeholder, and may keep the raw measurements under
``"detail"``.

Collective times follow the NCCL bus-bandwidth convention (nccl-tests' PERFORMANCE.md), so one bus
bandwidth per group size describes every op:

* all_reduce: ``latency + 2 (g-1)/g * bytes / busbw``
* all_gather, reduce_scatter: ``latency + (g-1)/g * bytes / busbw``, bytes = the full (unsharded) buffer
* all_to_all: ``latency + (g-1)/g * bytes / busbw``, bytes = everything one rank sends (its own
  slice included, which does not travel)
"""

from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, Union

from errors import UserError

__all__ = [
    "COLLECTIVE_OPS",
    "Curve",
    "DeviceProfile",
    "ProfileError",
    "SCHEMA_VERSION",
    "known_profiles",
    "load_profile",
    "profile_path",
]

SCHEMA_VERSION = 1
PROFILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
SOURCE_KINDS = ("measured", "vendor", "estimate", "copied", "placeholder")
# Fields whose numbers must say where they came from.
SOURCED_FIELDS = ("memory_gib", "peak_bf16_tflops", "kernel_launch_us", "memory_bandwidth_gbps",
                  "matmul", "grouped_gemm", "collectives")
# Spellings of a dtype that callers may use (torch's names, with or without "torch.").
_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}


class ProfileError(UserError):
    """A device profile that cannot be found or read, or a question it has no numbers for."""


def known_profiles() -> List[str]:
    """Names of the profiles shipped in compiler/profiles/ (the file names without .json)."""
    if not os.path.isdir(PROFILES_DIR):
        return []
    return sorted(f[:-len(".json")] for f in os.listdir(PROFILES_DIR) if f.endswith(".json"))


def profile_path(name: str) -> str:
    """The file of a shipped profile, e.g. 'h100' -> .../compiler/profiles/h100.json."""
    return os.path.join(PROFILES_DIR, f"{name}.json")


def normalize_dtype(dtype: Any) -> str:
    """'bf16' for 'bf16', 'bfloat16' or torch.bfloat16 (by its name, so torch need not be imported)."""
    text = str(dtype)
    if text.startswith("torch."):
        text = text[len("torch."):]
    try:
        return _DTYPE_ALIASES[text]
    except KeyError:
        raise ProfileError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPE_ALIASES.values()))}") from None


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """A measured curve y(x): log-log linear between points, clamped to the end points outside.

    Interpolating between two points never leaves the interval of their y values, so the curve is
    monotone wherever its points are.
    """

    points: Tuple[Tuple[float, float], ...]

    def __call__(self, x: float) -> float:
        xs = [p[0] for p in self.points]
        if x <= xs[0]:
            return self.points[0][1]
        if x >= xs[-1]:
            return self.points[-1][1]
        i = bisect.bisect_right(xs, x)  # xs[i-1] <= x < xs[i]
        (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))

    def to_json(self) -> List[List[float]]:
        return [[x, y] for x, y in self.points]


# --------------------------------------------------------------------------- the profile

# The runtime's speed options change what the eager trace sees; a profile may carry their measured
# effect on its device (bench/train_step.py measures each option alone):
EXECUTION_FACTORS = {
    "compiled_layer_bytes": "memory traffic of a decoder layer's non-GEMM ops under --compile layer, as a "
                            "fraction of the eager ops' traffic (fusion)",
    "compiled_layer_bytes_lora": "the same for a LoRA run's layers (frozen base, adapters trained); absent: full "
                                 "training's",
    "compiled_layer_saved": "activation bytes a compiled layer saves for its backward, as a fraction of the "
                            "eager layer's",
    "compiled_layer_saved_lora": "the same for a LoRA run's layers (frozen base, adapters trained); absent: "
                                 "eager's",
    "foreach_adamw": "time of the foreach AdamW step relative to the fused kernel's",
    "document_regroup_ms": "milliseconds per layer, forward + backward, that regrouping packed documents for a "
                           "causal kernel costs beyond the kernel itself (absent: 0)",
    "graph_replay_launch_kept": "the share of a compiled layer's kernel-launch cost still paid when the layer is "
                                "replayed as CUDA graphs (--compile layer_cudagraphs; absent: all of it)",
}


@dataclass
class DeviceProfile:
    """Costs of work on one device and of collectives among such devices; see the module doc."""

    name: str
    device_name: str
    memory_gib: float
    peak_bf16_tflops: float
    matmul: Dict[str, Curve]             # dtype -> [FLOPs, TFLOP/s]
    grouped_gemm: Dict[str, Curve]       # dtype -> [rows per expert, TFLOP/s]
    memory_bandwidth_gbps: float
    collectives: Dict[str, Dict[int, Dict[str, Any]]]  # op -> group size -> {"bus_bandwidth_gbps", "latency_us"}
    kernel_launch_us: float
    sources: Dict[str, Dict[str, str]]
    # Measured effects of the runtime's speed options, as factors on what the eager trace predicts
    # (see EXECUTION_FACTORS); absent: 1.0, no effect assumed.
    execution: Dict[str, float] = field(default_factory=dict)
    # attention option -> [kernel FLOPs of one fwd+bwd call, TFLOP/s] (see the module doc); empty: the
    # trace's kernel priced by the GEMM curve, and no attention choice for the search
    attention: Dict[str, Curve] = field(default_factory=dict)
    attention_masked: str = ""            # the listed kernel that prices SDPA with an explicit mask
    attention_sdpa_picks: str = ""        # what the plain `sdpa` runs here (documentation)
    host_sync_us: float = 0.0             # a device-to-host copy that waits for the stream
    expert_load_imbalance: Dict[int, float] = field(default_factory=dict)  # ep -> busiest / mean rank
    origin: str = field(default="<dict>", compare=False)  # the file it was read from, for messages

    # ----------------------------------------------------------------- compute

    @property
    def launch_s(self) -> float:
        return self.kernel_launch_us * 1e-6

    def matmul_time(self, m: float, n: float, k: float, dtype: Any = "bf16") -> float:
        """Seconds for an [m, k] x [k, n] GEMM: 2mnk FLOPs at the measured throughput for that
        many FLOPs, plus one kernel launch. An empty GEMM launches nothing and costs 0."""
        flops = 2.0 * m * n * k
        if flops <= 0:
            return 0.0
        tflops = self._curve(self.matmul, "matmul", dtype)(flops)
        return flops / (tflops * 1e12) + self.launch_s

    def grouped_gemm_time(self, tokens_per_expert: float, experts: int, n: float, k: float,
                          dtype: Any = "bf16") -> float:
        """Seconds for one grouped GEMM over `experts` groups of `tokens_per_expert` rows each
        ([rows, k] x [k, n] per expert), at the throughput measured for that many rows per expert.
        tokens_per_expert may be a (fractional) average."""
        flops = 2.0 * tokens_per_expert * experts * n * k
        if flops <= 0:
            return 0.0
        tflops = self._curve(self.grouped_gemm, "grouped_gemm", dtype)(tokens_per_expert)
        return flops / (tflops * 1e12) + self.launch_s

    def memory_time(self, nbytes: float) -> float:
        """Seconds for a memory-bound kernel that reads and writes `nbytes` in all."""
        if nbytes <= 0:
            return 0.0
        return nbytes / (self.memory_bandwidth_gbps * 1e9) + self.launch_s

    # ----------------------------------------------------------------- communication

    def collective_entry(self, op: str, group_size: int) -> Dict[str, Any]:
        """The measured figures used for `op` over `group_size` devices: those of that size, else
        of the nearest larger size measured (a larger ring is slower per byte, so this errs on the
        slow side), else of the largest one."""
        if op not in COLLECTIVE_OPS:
            raise ProfileError(f"unknown collective {op!r}; use one of {', '.join(COLLECTIVE_OPS)}")
        table = self.collectives.get(op)
        if not table:
            raise ProfileError(
                f"device profile '{self.name}' ({self.origin}) has no figures for {op}; measure them "
                f"with bench/profile_device.py launched by torchrun on several devices")
        sizes = sorted(table)
        larger = [s for s in sizes if s >= group_size]
        return table[larger[0] if larger else sizes[-1]]

    def collective_time(self, op: str, nbytes: float, group_size: int) -> float:
        """Seconds for one collective among `group_size` devices (the bytes conventions are in the
        module doc). A group of one, or an empty buffer, needs no collective and costs 0."""
        if op not in COLLECTIVE_OPS:
            raise ProfileError(f"unknown collective {op!r}; use one of {', '.join(COLLECTIVE_OPS)}")
        if group_size <= 1 or nbytes <= 0:
            return 0.0
        entry = self.collective_entry(op, group_size)
        g = group_size
        # all_reduce = reduce_scatter + all_gather, so each byte crosses the links twice.
        factor = 2.0 * (g - 1) / g if op == "all_reduce" else (g - 1) / g
        return entry["latency_us"] * 1e-6 + factor * nbytes / (entry["bus_bandwidth_gbps"] * 1e9)

    # ----------------------------------------------------------------- helpers

    def _curve(self, curves: Dict[str, Curve], what: str, dtype: Any) -> Curve:
        key = normalize_dtype(dtype)
        if key not in curves:
            raise ProfileError(
                f"device profile '{self.name}' ({self.origin}) has no {what} figures for {key}, only for "
                f"{', '.join(sorted(curves))}; measure them with bench/profile_device.py")
        return curves[key]

    def mfu(self, flops: float, seconds: float) -> float:
        """Model FLOPs utilisation of `flops` done in `seconds` on one device, against the peak."""
        return flops / (seconds * self.peak_bf16_tflops * 1e12)

    def to_json(self) -> Dict[str, Any]:
        """The JSON document of this profile (the format in the module doc)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "device_name": self.device_name,
            "memory_gib": self.memory_gib,
            "peak_bf16_tflops": self.peak_bf16_tflops,
            "kernel_launch_us": self.kernel_launch_us,
            "memory_bandwidth_gbps": self.memory_bandwidth_gbps,
            "matmul": {d: c.to_json() for d, c in self.matmul.items()},
            "grouped_gemm": {d: c.to_json() for d, c in self.grouped_gemm.items()},
            "collectives": {op: {str(g): dict(e) for g, e in sorted(table.items())}
                            for op, table in self.collectives.items()},
            "sources": self.sources,
            **({"execution": dict(self.execution)} if self.execution else {}),
            **({"attention": {"kernels": {k: c.to_json() for k, c in self.attention.items()},
                              **({"sdpa_picks": self.attention_sdpa_picks} if self.attention_sdpa_picks else {}),
                              **({"masked": self.attention_masked} if self.attention_masked else {})}}
               if self.attention else {}),
            **({"host_sync_us": self.host_sync_us} if self.host_sync_us else {}),
            **({"expert_load_imbalance": {str(g): f for g, f in sorted(self.expert_load_imbalance.items())}}
               if self.expert_load_imbalance else {}),
        }

    def execution_factor(self, name: str) -> float:
        return float(self.execution.get(name, 1.0))

    def attention_time(self, kernel: str, kernel_flops: float) -> float:
        """Seconds of one attention kernel call, forward and backward, that computes `kernel_flops`
        (the module doc's convention), at the throughput listed for `kernel`, plus its two launches."""
        if kernel not in self.attention:
            raise ProfileError(f"device profile '{self.name}' ({self.origin}) lists no attention kernel {kernel!r} "
                               f"(it lists {', '.join(self.attention) or 'none'}); measure it with "
                               "bench/train_step.py and bench/fit_execution_factors.py")
        if kernel_flops <= 0:
            return 0.0
        return kernel_flops / (self.attention[kernel](kernel_flops) * 1e12) + 2 * self.launch_s

    def load_imbalance(self, ep: int) -> float:
        """The busiest expert rank's routed slots over the mean rank's for an expert-parallel group of
        `ep` ranks: the figure measured for that size, else for the nearest larger one measured (more
        ranks are less balanced), else the largest; 1.0 without expert parallelism or figures."""
        if ep <= 1 or not self.expert_load_imbalance:
            return 1.0
        sizes = sorted(self.expert_load_imbalance)
        larger = [g for g in sizes if g >= ep]
        return self.expert_load_imbalance[larger[0] if larger else sizes[-1]]

    @classmethod
    def from_json(cls, doc: Any, origin: str = "<dict>") -> "DeviceProfile":
        """Validate a parsed JSON document; errors name `origin`, the field and the fix."""
        return _Parser(origin).profile(doc)


# --------------------------------------------------------------------------- loading


def load_profile(name_or_path: Union[str, os.PathLike, DeviceProfile]) -> DeviceProfile:
    """A shipped profile by name ('h100', 'h200', 'cpu') or any profile file by path."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text = os.fspath(name_or_path)
    known = known_profiles()
    if text in known:
        path = profile_path(text)
    elif os.path.isfile(text):
        path = text
    else:
        what = "no such profile file" if (os.sep in text or text.endswith(".json")) else "unknown device profile"
        raise ProfileError(
            f"{what} '{text}': known profiles are {', '.join(known) or '(none found)'}; "
            f"or pass a JSON file path to --device_profile (bench/profile_device.py writes one)")
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ProfileError(f"device profile file {path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ProfileError(f"device profile file {path}: cannot be read ({e})") from None
    return DeviceProfile.from_json(doc, origin=path)


class _Parser:
    """Reads one profile document; every error names the file and the field."""

    def __init__(self, origin: str):
        self.origin = origin

    def fail(self, field_name: str, problem: str) -> ProfileError:
        return ProfileError(f"device profile file {self.origin}: field '{field_name}' {problem} "
                            f"(the format is described in compiler/profiles.py)")

    def get(self, doc: Dict[str, Any], key: str, where: str = "") -> Any:
        if key not in doc:
            raise self.fail(where + key, "is missing")
        return doc[key]

    def positive(self, value: Any, field_name: str) -> float:
        # bool is an int in Python; a true/false here is certainly a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0:
            raise self.fail(field_name, f"must be a positive number, not {value!r}")
        return float(value)

    def string(self, value: Any, field_name: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field_name, f"must be a non-empty string, not {value!r}")
        return value

    def curve(self, value: Any, field_name: str) -> Curve:
        if not isinstance(value, list) or not value:
            raise self.fail(field_name, "must be a non-empty list of [x, y] points")
        points: List[Tuple[float, float]] = []
        for i, p in enumerate(value):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise self.fail(f"{field_name}[{i}]", f"must be an [x, y] pair, not {p!r}")
            points.append((self.positive(p[0], f"{field_name}[{i}][0]"),
                           self.positive(p[1], f"{field_name}[{i}][1]")))
        for i in range(1, len(points)):
            if points[i][0] <= points[i - 1][0]:
                raise self.fail(field_name, f"must have strictly increasing x; point {i} has "
                                            f"{points[i][0]:g} after {points[i - 1][0]:g}")
        return Curve(tuple(points))

    def curves(self, value: Any, field_name: str) -> Dict[str, Curve]:
        if not isinstance(value, dict) or not value:
            raise self.fail(field_name, "must be an object mapping a dtype ('bf16', 'fp32', ...) to a curve")
        out = {}
        for dtype, curve in value.items():
            try:
                key = normalize_dtype(dtype)
            except ProfileError as e:
                raise self.fail(f"{field_name}.{dtype}", str(e)) from None
            out[key] = self.curve(curve, f"{field_name}.{dtype}")
        return out

    def collectives(self, value: Any) -> Dict[str, Dict[int, Dict[str, Any]]]:
        if not isinstance(value, dict):
            raise self.fail("collectives", "must be an object mapping an op to its group sizes")
        out: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for op, table in value.items():
            where = f"collectives.{op}"
            if op not in COLLECTIVE_OPS:
                raise self.fail(where, f"is not a known collective; use {', '.join(COLLECTIVE_OPS)}")
            if not isinstance(table, dict):
                raise self.fail(where, "must be an object mapping a group size to its figures")
            out[op] = {}
            for size, entry in table.items():
                at = f"{where}.{size}"
                try:
                    g = int(size)
                except ValueError:
                    raise self.fail(at, "must be keyed by a group size (an integer >= 2)") from None
                if g < 2:
                    raise self.fail(at, "must be keyed by a group size >= 2 (a group of one is free)")
                if not isinstance(entry, dict):
                    raise self.fail(at, "must be an object {\"bus_bandwidth_gbps\": ..., \"latency_us\": ...}")
                parsed = {
                    "bus_bandwidth_gbps": self.positive(self.get(entry, "bus_bandwidth_gbps", at + "."),
                                                        at + ".bus_bandwidth_gbps"),
                    # A latency of 0 is a legitimate (if optimistic) figure, so only negatives are refused.
                    "latency_us": self.non_negative(self.get(entry, "latency_us", at + "."), at + ".latency_us"),
                }
                if "points" in entry:
                    parsed["points"] = [list(p) for p in self.curve(entry["points"], at + ".points").points]
                out[op][g] = parsed
        return out

    def non_negative(self, value: Any, field_name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0:
            raise self.fail(field_name, f"must be a number >= 0, not {value!r}")
        return float(value)

    def sources(self, value: Any) -> Dict[str, Dict[str, str]]:
        if not isinstance(value, dict):
            raise self.fail("sources", "must be an object mapping a field to {\"kind\": ..., \"note\": ...}")
        for key in SOURCED_FIELDS:
            if key not in value:
                raise self.fail(f"sources.{key}", "is missing: say where this number came from")
        for key, entry in value.items():
            if not isinstance(entry, dict):
                raise self.fail(f"sources.{key}", "must be an object {\"kind\": ..., \"note\": ...}")
            kind = self.get(entry, "kind", f"sources.{key}.")
            if kind not in SOURCE_KINDS:
                raise self.fail(f"sources.{key}.kind", f"must be one of {', '.join(SOURCE_KINDS)}, not {kind!r}")
            self.string(self.get(entry, "note", f"sources.{key}."), f"sources.{key}.note")
        return value

    def profile(self, doc: Any) -> DeviceProfile:
        if not isinstance(doc, dict):
            raise ProfileError(f"device profile file {self.origin}: must hold a JSON object")
        version = self.get(doc, "schema_version")
        if version != SCHEMA_VERSION:
            raise self.fail("schema_version", f"is {version!r}; this code reads version {SCHEMA_VERSION}")
        return DeviceProfile(
            name=self.string(self.get(doc, "name"), "name"),
            device_name=self.string(self.get(doc, "device_name"), "device_name"),
            memory_gib=self.positive(self.get(doc, "memory_gib"), "memory_gib"),
            peak_bf16_tflops=self.positive(self.get(doc, "peak_bf16_tflops"), "peak_bf16_tflops"),
            matmul=self.curves(self.get(doc, "matmul"), "matmul"),
            grouped_gemm=self.curves(self.get(doc, "grouped_gemm"), "grouped_gemm"),
            memory_bandwidth_gbps=self.positive(self.get(doc, "memory_bandwidth_gbps"), "memory_bandwidth_gbps"),
            collectives=self.collectives(self.get(doc, "collectives")),
            kernel_launch_us=self.non_negative(self.get(doc, "kernel_launch_us"), "kernel_launch_us"),
            sources=self.sources(self.get(doc, "sources")),
            execution=self.execution(doc.get("execution", {})),
            **self.attention(doc.get("attention"), doc.get("sources", {})),
            host_sync_us=self.non_negative(doc.get("host_sync_us", 0.0), "host_sync_us"),
            expert_load_imbalance=self.imbalance(doc.get("expert_load_imbalance", {})),
            origin=self.origin,
        )

    def attention(self, doc: Any, sources: Dict[str, Any]) -> Dict[str, Any]:
        """The optional `attention` object: kernel curves keyed by attention option, the masked kernel."""
        if doc is None:
            return {}
        from options import ATTENTION_KERNELS  # the option's choices: a profile names only kernels a run has
        if not isinstance(doc, dict) or not isinstance(doc.get("kernels"), dict) or not doc["kernels"]:
            raise self.fail("attention", "must be an object {\"kernels\": {option: curve, ...}, \"masked\": option}")
        unknown = sorted(set(doc) - {"kernels", "masked", "sdpa_picks"})
        if unknown:
            raise self.fail(f"attention.{unknown[0]}", "is not a field of attention (kernels, masked, sdpa_picks)")
        if "attention" not in sources:
            raise self.fail("sources.attention", "is missing: say where the attention throughputs came from")
        kernels = {}
        for name, curve in doc["kernels"].items():
            if name not in ATTENTION_KERNELS:
                raise self.fail(f"attention.kernels.{name}",
                                f"is not an attention option; use {', '.join(ATTENTION_KERNELS)}")
            kernels[name] = self.curve(curve, f"attention.kernels.{name}")
        masked = doc.get("masked", "")
        if masked and masked not in kernels:
            raise self.fail("attention.masked", f"names {masked!r}, which attention.kernels does not list")
        picks = doc.get("sdpa_picks", "")
        if picks:
            self.string(picks, "attention.sdpa_picks")
        return {"attention": kernels, "attention_masked": masked, "attention_sdpa_picks": picks}

    def imbalance(self, doc: Any) -> Dict[int, float]:
        if not isinstance(doc, dict):
            raise self.fail("expert_load_imbalance", "must be an object mapping an expert-parallel degree to a factor")
        out = {}
        for size, value in doc.items():
            try:
                g = int(size)
            except ValueError:
                raise self.fail(f"expert_load_imbalance.{size}", "must be keyed by a group size >= 2") from None
            factor = self.positive(value, f"expert_load_imbalance.{size}")
            if g < 2 or factor < 1.0:
                raise self.fail(f"expert_load_imbalance.{size}", "must be keyed by a group size >= 2, with a factor "
                                "of at least 1 (the busiest rank over the mean rank)")
            out[g] = factor
        return out

    def execution(self, doc: Any) -> Dict[str, float]:
        if not isinstance(doc, dict):
            raise self.fail("execution", "must be an object of factor name -> positive number")
        unknown = sorted(set(doc) - set(EXECUTION_FACTORS))
        if unknown:
            raise self.fail(f"execution.{unknown[0]}", f"is not a known factor; known: {', '.join(EXECUTION_FACTORS)}")
        return {k: self.positive(v, f"execution.{k}") for k, v in doc.items()}
