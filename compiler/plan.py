"""The plan: what the compiler decides and the runtime executes. One module reads, writes and
validates it, so both sides agree on every field.

A plan is a versioned JSON document (see `Plan.to_json`). Its device mesh has the named axes
`pp` (pipeline stages), `dp` (data parallel), `ep` (expert parallel) and `tp` (tensor parallel),
in that order, whose sizes multiply to `plan_ngpus`. Device d of the plan has the row-major
coordinates of d in that mesh. Dense parameters are data parallel over dp x ep; routed experts
are split over ep (tokens travel by all-to-all) and data parallel over dp. At run time the plan
is replicated `runtime_ngpus / plan_ngpus` times along an outer `replica` axis.

Errors are `PlanError`s whose messages name the file, the field and the fix.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from errors import UserError, read_json
from modeling import spec

PLAN_VERSION = 1
MESH_AXES = ("pp", "dp", "ep", "tp")
# ZeRO levels as FSDP2 runs them: 0 replicates everything (gradients all-reduced); 2 shards fp32
# weights, gradients and optimizer state and keeps the bf16 weights gathered from forward to
# backward; 3 also regathers them for the backward. `shard_over_replicas` extends the sharding
# group over the runtime replicas (FSDP over replica x dp) instead of replicating the shards (HSDP).
ZERO_LEVELS = (0, 2, 3)
RECOMPUTE_MODES = ("none", "full")
SCHEDULES = ("GradAccum", "1F1B", "Interleaved1F1B")


class PlanError(UserError):
    """A plan that cannot be read, or does not fit the model or the run."""


def model_fingerprint(config):
    """The shape-fixing config fields (spec.FINGERPRINT_FIELDS, absent ones as None) and a short hash."""
    fields = {name: getattr(config, name, None) for name in spec.FINGERPRINT_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return fields, digest


@dataclass
class Stage:
    index: int
    layers: List[int]          # [first, last + 1) of the decoder layers on this stage
    devices: List[int]         # plan devices holding this stage
    embed: bool = False        # holds the token embedding (first stage)
    head: bool = False         # holds the final norm, lm_head and loss (last stage)
    recompute: str = "none"    # activation recompute of this stage's layers
    # Interleaved schedules only: the stage's model chunks, [first, last + 1) each. Chunk j of stage s
    # is virtual stage s + j * pp, and virtual stages hold consecutive layers in their order.
    chunks: Optional[List[List[int]]] = None


@dataclass
class Plan:
    model: Dict                # name, model_type, fingerprint (dict), fingerprint_sha
    search_inputs: Dict        # seq_len, micro_batch_size, global_batch_size, runtime_ngpus, device_profile, mem_limit_gib
    plan_ngpus: int
    mesh: Dict[str, int]       # axis -> size, axes in MESH_AXES order
    stages: List[Stage]
    ops: Dict[str, Dict]       # op family (spec.OP_FAMILIES) -> {"partition", ...}; "ns::op" -> annotated op
    zero: Dict                 # level (ZERO_LEVELS), shard_over_replicas (bool)
    schedule: Dict             # name, micro_batches, virtual_stages
    predicted: Dict            # step_time_s, peak_memory_gib (list per device), mfu, ...
    alternatives: List[Dict] = field(default_factory=list)
    explanation: str = ""
    version: int = PLAN_VERSION
    # the runtime's speed options the prediction assumes (train.py --compile, --ce_chunk_tokens,
    # --fused_adamw, --defer_grad_sync); a run uses them unless its own flags say otherwise
    execution: Dict = field(default_factory=dict)

    # ---- derived views -----------------------------------------------------------------------
    def device_coords(self, device):
        """Row-major coordinates of a plan device in the mesh, as {axis: index}."""
        coords, rest = {}, device
        for axis in reversed(MESH_AXES):
            coords[axis] = rest % self.mesh[axis]
            rest //= self.mesh[axis]
        return {axis: coords[axis] for axis in MESH_AXES}

    def op_partitions(self, source="<plan>"):
        """{family: partition} for every op family of the model (spec.OP_FAMILIES): the plan's `ops`
        entry of the family, "replicate" where it has none. Each is one of the family's declared
        partitions, and one that splits over a mesh axis (the family's tensor_parallel over tp, its
        expert_parallel over ep) needs that axis larger than 1. The one statement of how the
        model is split; `validate` calls it, and the runtime applies what it returns."""
        if not isinstance(self.ops, dict):
            raise PlanError(f"{source}: field `ops` must be an object of op family -> partition; recompile the plan")
        for key in self.ops:
            if key not in spec.OP_FAMILIES and "::" not in key:
                raise PlanError(f"{source}: field `ops.{key}` is not an op family of the model (families: "
                                f"{', '.join(spec.OP_FAMILIES)}; annotated ops are named ns::op); recompile the plan")
        partitions = {}
        for name, family in spec.OP_FAMILIES.items():
            entry = self.ops.get(name)
            if entry is None:
                partitions[name] = "replicate"
                continue
            partition = entry.get("partition") if isinstance(entry, dict) else None
            if partition not in family.partitions:
                raise PlanError(f"{source}: field `ops.{name}.partition` is {partition!r}; the {name} family admits "
                                f"{list(family.partitions)}; use one of them or recompile the plan")
            axis = ("tp" if partition == family.tensor_parallel
                    else "ep" if partition == family.expert_parallel else None)
            if axis is not None and self.mesh.get(axis, 1) <= 1:
                raise PlanError(f"{source}: field `ops.{name}.partition` is {partition!r}, which splits over the "
                                f"{axis} axis, but mesh.{axis} is {self.mesh.get(axis, 1)}; set the partition to "
                                f"replicate or recompile the plan")
            partitions[name] = partition
        return partitions

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self):
        d = asdict(self)
        order = ["version", "model", "search_inputs", "plan_ngpus", "mesh", "stages", "ops",
                 "zero", "schedule", "execution", "predicted", "explanation", "alternatives"]
        return {k: d[k] for k in order}

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)  # never leave a half-written plan behind

    @classmethod
    def from_dict(cls, d, source="<plan>"):
        def need(key, container=d, where=""):
            if key not in container:
                raise PlanError(f"{source}: missing field `{where}{key}`; recompile with "
                                "`python train.py --run_mode compile ...`")
            return container[key]

        version = need("version")
        if version != PLAN_VERSION:
            raise PlanError(f"{source}: plan version {version} is not supported (this code reads version "
                            f"{PLAN_VERSION}); recompile the plan")
        stages = []
        for i, s in enumerate(need("stages")):
            stages.append(Stage(index=need("index", s, f"stages[{i}]."), layers=list(need("layers", s, f"stages[{i}].")),
                                devices=list(need("devices", s, f"stages[{i}].")), embed=bool(s.get("embed", False)),
                                head=bool(s.get("head", False)), recompute=s.get("recompute", "none"),
                                chunks=s.get("chunks")))
        plan = cls(model=need("model"), search_inputs=need("search_inputs"), plan_ngpus=need("plan_ngpus"),
                   mesh=dict(need("mesh")), stages=stages, ops=need("ops"), zero=need("zero"),
                   schedule=need("schedule"), predicted=need("predicted"),
                   alternatives=d.get("alternatives", []), explanation=d.get("explanation", ""), version=version,
                   execution=dict(d.get("execution", {})))
        plan.validate(source)
        return plan

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise PlanError(f"plan file {path} not found; create it with `python train.py --run_mode compile ...` "
                            "or pass another --plan")
        return cls.from_dict(read_json(path, PlanError, "recompile the plan"), source=path)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, source="<plan>"):
        """Internal consistency: mesh product, stages covering the layers, known modes."""
        def bad(field_name, msg):
            raise PlanError(f"{source}: field `{field_name}`: {msg}")

        if list(self.mesh) != list(MESH_AXES):
            bad("mesh", f"axes must be {list(MESH_AXES)} in this order, got {list(self.mesh)}")
        product = 1
        for axis, size in self.mesh.items():
            if not isinstance(size, int) or size < 1:
                bad(f"mesh.{axis}", f"size must be a positive integer, got {size!r}")
            product *= size
        if product != self.plan_ngpus:
            bad("mesh", f"sizes multiply to {product} but plan_ngpus is {self.plan_ngpus}")
        if len(self.stages) != self.mesh["pp"]:
            bad("stages", f"{len(self.stages)} stages but mesh.pp is {self.mesh['pp']}")
        num_layers = self.model.get("fingerprint", {}).get("num_hidden_layers")
        interleaved = self.schedule.get("name") == "Interleaved1F1B"
        expected_start = 0
        for i, s in enumerate(self.stages):
            if s.index != i:
                bad(f"stages[{i}].index", f"expected {i}, got {s.index}")
            if interleaved:
                continue  # layers come in chunks, checked below
            if len(s.layers) != 2 or s.layers[0] != expected_start or s.layers[1] < s.layers[0]:
                bad(f"stages[{i}].layers", f"{s.layers} does not continue from layer {expected_start}")
            expected_start = s.layers[1]
            if s.recompute not in RECOMPUTE_MODES:
                bad(f"stages[{i}].recompute", f"{s.recompute!r} is not one of {RECOMPUTE_MODES}")
            per_stage = self.plan_ngpus // self.mesh["pp"]
            if sorted(s.devices) != list(range(i * per_stage, (i + 1) * per_stage)):
                bad(f"stages[{i}].devices", f"stage {i} must hold devices {i * per_stage}..{(i + 1) * per_stage - 1}")
        if interleaved:
            v = self.schedule.get("virtual_stages", 1)
            if any(s.chunks is None or len(s.chunks) != v for s in self.stages):
                bad("stages[].chunks", f"an interleaved plan lists virtual_stages ({v}) chunks per stage")
            for k in range(self.mesh["pp"] * v):
                chunk = self.stages[k % self.mesh["pp"]].chunks[k // self.mesh["pp"]]
                if chunk[0] != expected_start or chunk[1] <= chunk[0]:
                    bad(f"stages[{k % self.mesh['pp']}].chunks", f"virtual stage {k} {chunk} does not continue "
                        f"from layer {expected_start}")
                expected_start = chunk[1]
        if num_layers is not None and expected_start != num_layers:
            bad("stages", f"layers end at {expected_start} but the model has {num_layers}")
        if not self.stages[0].embed or not self.stages[-1].head:
            bad("stages", "the first stage must hold the embedding and the last the head")
        if not isinstance(self.zero, dict) or self.zero.get("level") not in ZERO_LEVELS:
            bad("zero.level", f"{self.zero!r}: level must be one of {ZERO_LEVELS}")
        if not isinstance(self.zero.get("shard_over_replicas"), bool):
            bad("zero.shard_over_replicas", "must be true or false")
        if self.schedule.get("name") not in SCHEDULES:
            bad("schedule.name", f"{self.schedule.get('name')!r} is not one of {SCHEDULES}")
        if self.mesh["pp"] == 1 and self.schedule["name"] != "GradAccum":
            bad("schedule.name", "a plan without pipeline stages uses GradAccum")
        if self.mesh["pp"] > 1 and self.schedule["name"] == "GradAccum":
            bad("schedule.name", "a pipelined plan needs 1F1B or Interleaved1F1B")
        mb = self.schedule.get("micro_batches")
        if not isinstance(mb, int) or mb < 1:
            bad("schedule.micro_batches", f"must be a positive integer, got {mb!r}")
        if self.mesh["pp"] > 1 and mb < self.mesh["pp"]:
            bad("schedule.micro_batches", f"{mb} is fewer than the {self.mesh['pp']} pipeline stages")
        self.op_partitions(source)
        peaks = self.predicted.get("peak_memory_gib")
        if not isinstance(peaks, list) or len(peaks) != self.plan_ngpus:
            bad("predicted.peak_memory_gib", f"must list one value per plan device ({self.plan_ngpus})")

    def check_model(self, config, source="<plan>"):
        """Refuses a plan made for another model; names every differing field."""
        fields, _ = model_fingerprint(config)
        planned = self.model.get("fingerprint", {})
        diffs = [f"{k}: plan {planned.get(k)!r} vs model {v!r}" for k, v in fields.items() if planned.get(k) != v]
        if diffs:
            raise PlanError(f"{source} was made for another model ({self.model.get('name')}); differing config "
                            f"fields: " + "; ".join(diffs) + ". Compile a plan for this model with "
                            "`python train.py --run_mode compile --model_id ...`")

    def check_run(self, plan_ngpus, runtime_ngpus, source="<plan>"):
        if plan_ngpus is not None and plan_ngpus != self.plan_ngpus:
            raise PlanError(f"{source} is for {self.plan_ngpus} devices but --plan_ngpus is {plan_ngpus}")
        if runtime_ngpus % self.plan_ngpus:
            raise PlanError(f"--runtime_ngpus {runtime_ngpus} is not a multiple of the plan's {self.plan_ngpus} "
                            "devices; use a multiple, or compile a plan whose --plan_ngpus divides it")


def default_plan_path(model_name, plan_ngpus, plans_dir="plans"):
    return os.path.join(plans_dir, f"{model_name}-{plan_ngpus}gpu.json")


def model_name_of(model_id):
    """A readable name for file names: the directory's (or hub id's) last component."""
    return os.path.basename(os.path.normpath(model_id)).lower()


def split_ops_text(plan):
    """The op families the plan splits, e.g. "experts expert (all_to_all), others replicated"."""
    split = []
    for name, partition in plan.op_partitions().items():
        if partition != "replicate":
            dispatch = plan.ops.get(name, {}).get("dispatch")
            split.append(f"{name} {partition}" + (f" ({dispatch})" if dispatch and dispatch != "local" else ""))
    return ", ".join(split + ["others replicated"]) if split else "all replicated"


def summarize(plan):
    """A few lines a person reads first."""
    m = plan.mesh
    p = plan.predicted
    lines = [
        f"plan for {plan.model.get('name')} on {plan.plan_ngpus} devices "
        f"(x{plan.search_inputs.get('runtime_ngpus', plan.plan_ngpus) // plan.plan_ngpus} replicas at run time)",
        f"  mesh: pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']}; zero {plan.zero['level']}"
        f"{' (sharded over replicas too)' if plan.zero['shard_over_replicas'] else ''}; "
        f"schedule {plan.schedule['name']} with {plan.schedule['micro_batches']} micro-batches",
        "  stages: " + ", ".join(f"{s.index}: layers {s.layers[0]}-{s.layers[1] - 1} on devices {s.devices}"
                                 f" (recompute {s.recompute})" for s in plan.stages),
        "  ops: " + split_ops_text(plan),
        f"  predicted: step {p['step_time_s']:.3f} s, MFU {100 * p.get('mfu', 0):.1f} %, peak memory "
        f"{max(p['peak_memory_gib']):.1f} GiB (limit {plan.search_inputs.get('mem_limit_gib')} GiB)",
    ]
    return "\n".join(lines)

