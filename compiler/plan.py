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


RECOMPILE = "recompile the plan with `python train.py --run_mode compile ...` (or fix the field)"
# Counts (devices, layers, tokens, sequences) above this are a typo, not a machine.
MAX_COUNT = 2 ** 31 - 1


def _is_bool(value):
    return isinstance(value, bool)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    import math
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _type_name(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


class _Document:
    """Reads a plan's JSON document field by field; each problem is one PlanError naming the file,
    the field (as a dotted path) and the fix."""

    def __init__(self, source):
        self.source = source

    def fail(self, where, msg):
        raise PlanError(f"{self.source}: field `{where}` {msg}; {RECOMPILE}")

    def _lookup(self, container, key, where, required):
        """(dotted path, value or None); a required field that is absent is a PlanError."""
        path = f"{where}.{key}" if where else key
        if key not in container and required:
            raise PlanError(f"{self.source}: missing field `{path}`; {RECOMPILE}")
        return path, container.get(key)

    def get(self, container, key, where, kind, required=True):
        """container[key] checked to be `kind` ("object", "list", "string", "bool"); None if optional and absent."""
        path, value = self._lookup(container, key, where, required)
        if key not in container:
            return None
        ok = {"object": isinstance(value, dict), "list": isinstance(value, list),
              "string": isinstance(value, str) and value != "", "bool": _is_bool(value)}[kind]
        if not ok:
            self.fail(path, f"must be {'a non-empty string' if kind == 'string' else 'an ' + kind if kind == 'object' else 'a ' + kind}, "
                            f"got {_type_name(value)} {_short(value)}")
        return value

    def count(self, container, key, where, low=1, required=True):
        """An integer in [low, MAX_COUNT]."""
        path, value = self._lookup(container, key, where, required)
        if key not in container:
            return None
        if not _is_int(value) or not low <= value <= MAX_COUNT:
            self.fail(path, f"must be an integer from {low} to {MAX_COUNT}, got {_type_name(value)} {_short(value)}")
        return value

    def number(self, container, key, where, required=True, positive=False):
        """A finite number >= 0 (> 0 if positive)."""
        path, value = self._lookup(container, key, where, required)
        if key not in container:
            return None
        if not _is_number(value) or value < 0 or (positive and value == 0):
            self.fail(path, f"must be a finite number {'> 0' if positive else '>= 0'}, got {_type_name(value)} "
                            f"{_short(value)}")
        return value

    def pair(self, value, path):
        """[first, end) of layers: two integers 0 <= first <= end."""
        if not (isinstance(value, list) and len(value) == 2 and all(_is_int(x) and 0 <= x <= MAX_COUNT for x in value)):
            self.fail(path, f"must be [first, end] (two non-negative integers), got {_short(value)}")
        return value

    def predicted(self, container, where, ngpus=None):
        predicted = self.get(container, "predicted", where, "object")
        at = f"{where}.predicted" if where else "predicted"
        self.number(predicted, "step_time_s", at)
        peaks = self.get(predicted, "peak_memory_gib", at, "list")
        if not peaks or not all(_is_number(x) and x >= 0 for x in peaks) or (ngpus is not None and len(peaks) != ngpus):
            self.fail(f"{at}.peak_memory_gib", f"must list one number >= 0 per plan device"
                                               f"{f' ({ngpus})' if ngpus is not None else ''}, got {_short(peaks)}")
        for key in ("mfu", "tokens_per_s", "model_flops_per_step"):
            self.number(predicted, key, at, required=False)
        return predicted


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_document(d, source="<plan>"):
    """Every field of a plan document that the runtime, inspect and the report read: present, of the
    right type and in range. Consistency between fields is `Plan.validate` / `Plan.check_batch`."""
    doc = _Document(source)
    if not isinstance(d, dict):
        raise PlanError(f"{source}: a plan is a JSON object (version, model, search_inputs, ...), got "
                        f"{_type_name(d)}; {RECOMPILE}")
    if "version" not in d:
        raise PlanError(f"{source}: missing field `version`; {RECOMPILE}")
    if d["version"] != PLAN_VERSION or not _is_int(d["version"]):
        raise PlanError(f"{source}: plan version {d['version']!r} is not supported (this code reads version "
                        f"{PLAN_VERSION}); recompile the plan")
    model = doc.get(d, "model", "", "object")
    doc.get(model, "name", "model", "string")
    doc.get(model, "model_type", "model", "string", required=False)
    doc.get(model, "model_id", "model", "string", required=False)
    fingerprint = doc.get(model, "fingerprint", "model", "object")
    doc.count(fingerprint, "num_hidden_layers", "model.fingerprint")
    sha = doc.get(model, "fingerprint_sha", "model", "string")
    if sha != fingerprint_sha(fingerprint):
        doc.fail("model.fingerprint_sha", f"{sha!r} is not the hash of model.fingerprint "
                                          f"({fingerprint_sha(fingerprint)!r}): the fingerprint was edited")

    inputs = doc.get(d, "search_inputs", "", "object")
    doc.count(inputs, "seq_len", "search_inputs", low=2)
    doc.count(inputs, "micro_batch_size", "search_inputs")
    doc.count(inputs, "global_batch_size", "search_inputs")
    doc.count(inputs, "runtime_ngpus", "search_inputs")
    doc.get(inputs, "device_profile", "search_inputs", "string")
    doc.number(inputs, "mem_limit_gib", "search_inputs", positive=True)
    if "dtype" in inputs and inputs["dtype"] not in ("bf16", "fp32"):
        doc.fail("search_inputs.dtype", f"must be \"bf16\" or \"fp32\", got {_short(inputs['dtype'])}")
    doc.get(inputs, "document_masking", "search_inputs", "bool", required=False)
    imbalance = inputs.get("expert_load_imbalance")
    factors = list(imbalance.values()) if isinstance(imbalance, dict) else [imbalance]
    if "expert_load_imbalance" in inputs and not all(_is_number(f) and f >= 1 for f in factors):
        doc.fail("search_inputs.expert_load_imbalance", "must be a number >= 1 or an object of expert-parallel degree "
                                                        f"-> number >= 1, got {_short(imbalance)}")

    ngpus = doc.count(d, "plan_ngpus", "")
    mesh = doc.get(d, "mesh", "", "object")
    if list(mesh) != list(MESH_AXES):
        doc.fail("mesh", f"must have the axes {list(MESH_AXES)} in this order, got {list(mesh)}")
    for axis in MESH_AXES:
        doc.count(mesh, axis, "mesh")

    stages = doc.get(d, "stages", "", "list")
    if not stages:
        doc.fail("stages", "must list at least one stage")
    for i, stage in enumerate(stages):
        at = f"stages[{i}]"
        if not isinstance(stage, dict):
            doc.fail(at, f"must be an object (index, layers, devices, ...), got {_type_name(stage)}")
        doc.count(stage, "index", at, low=0)
        doc.pair(doc.get(stage, "layers", at, "list"), f"{at}.layers")
        devices = doc.get(stage, "devices", at, "list")
        if not devices or not all(_is_int(x) and 0 <= x < ngpus for x in devices) or len(set(devices)) != len(devices):
            doc.fail(f"{at}.devices", f"must list distinct plan devices 0..{ngpus - 1}, got {_short(devices)}")
        doc.get(stage, "embed", at, "bool", required=False)
        doc.get(stage, "head", at, "bool", required=False)
        if stage.get("recompute", "none") not in RECOMPUTE_MODES:
            doc.fail(f"{at}.recompute", f"must be one of {list(RECOMPUTE_MODES)}, got {_short(stage['recompute'])}")
        chunks = stage.get("chunks")
        if chunks is not None:
            if not isinstance(chunks, list) or not chunks:
                doc.fail(f"{at}.chunks", f"must be null or a list of [first, end] layer ranges, got {_short(chunks)}")
            for j, chunk in enumerate(chunks):
                doc.pair(chunk, f"{at}.chunks[{j}]")

    ops = doc.get(d, "ops", "", "object")
    for name, entry in ops.items():
        if not isinstance(entry, dict):
            doc.fail(f"ops.{name}", f"must be an object (partition, annotation, ...), got {_type_name(entry)}")

    zero = doc.get(d, "zero", "", "object")
    level = zero.get("level")
    if not _is_int(level) or level not in ZERO_LEVELS:
        doc.fail("zero.level", f"must be one of {list(ZERO_LEVELS)}, got {_short(level)}")
    doc.get(zero, "shard_over_replicas", "zero", "bool")

    schedule = doc.get(d, "schedule", "", "object")
    if schedule.get("name") not in SCHEDULES:
        doc.fail("schedule.name", f"must be one of {list(SCHEDULES)}, got {_short(schedule.get('name'))}")
    doc.count(schedule, "micro_batches", "schedule")
    doc.count(schedule, "virtual_stages", "schedule", required=False)

    execution = doc.get(d, "execution", "", "object", required=False) or {}
    _check_execution(doc, execution)
    _check_lora(doc, d)
    doc.predicted(d, "", ngpus)
    alternatives = doc.get(d, "alternatives", "", "list", required=False) or []
    for i, alt in enumerate(alternatives):
        at = f"alternatives[{i}]"
        if not isinstance(alt, dict):
            doc.fail(at, f"must be an object (summary, predicted), got {_type_name(alt)}")
        doc.get(alt, "summary", at, "string")
        doc.predicted(alt, at)
        if "rejected" in alt and not isinstance(alt["rejected"], str):
            doc.fail(f"{at}.rejected", f"must be a string, got {_type_name(alt['rejected'])}")
    if "explanation" in d and not isinstance(d["explanation"], str):
        doc.fail("explanation", f"must be a string, got {_type_name(d['explanation'])}")


def _check_execution(doc, execution):
    """The speed options a plan records: known names (options.ExecutionOptions.COSTED), each of its
    option's type and choices."""
    import dataclasses
    from options import ExecutionOptions
    fields = {f.name: f for f in dataclasses.fields(ExecutionOptions) if f.name in ExecutionOptions.COSTED}
    for name, value in execution.items():
        f = fields.get(name)
        if f is None:
            doc.fail(f"execution.{name}", f"is not a recorded execution option (known: {list(fields)})")
        choices, default = f.metadata.get("choices"), f.default
        if choices:
            ok, want = value in choices and isinstance(value, str), f"one of {list(choices)}"
        elif isinstance(default, bool):
            ok, want = _is_bool(value), "true or false"
        elif isinstance(default, int):
            ok, want = _is_int(value) and 0 <= value <= MAX_COUNT, "an integer >= 0"
        else:
            ok, want = True, ""
        if not ok:
            doc.fail(f"execution.{name}", f"must be {want}, got {_short(value)}")


def _check_lora(doc, d):
    """The optional `lora` field: {rank, alpha, dropout, targets}, each in the range the options allow."""
    if d.get("lora") is None:
        return
    lora = doc.get(d, "lora", "", "object")
    doc.count(lora, "rank", "lora")
    doc.number(lora, "alpha", "lora", positive=True)
    dropout = doc.number(lora, "dropout", "lora")
    if dropout >= 1:
        doc.fail("lora.dropout", f"must be below 1, got {_short(dropout)}")
    targets = doc.get(lora, "targets", "lora", "list")
    try:
        ok = bool(targets) and all(isinstance(t, str) for t in targets) and \
            list(spec.parse_lora_targets(targets)) == targets
    except ValueError:
        ok = False
    if not ok:
        doc.fail("lora.targets", f"must list distinct families among {list(spec.LORA_TARGETS)} in that order, got "
                                 f"{_short(targets)}")
    unknown = sorted(set(lora) - {"rank", "alpha", "dropout", "targets"})
    if unknown:
        doc.fail(f"lora.{unknown[0]}", "is not a LoRA option (rank, alpha, dropout, targets)")


def fingerprint_sha(fields):
    """The short hash of a fingerprint's fields (what `model.fingerprint_sha` records)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(config):
    """The shape-fixing config fields (spec.FINGERPRINT_FIELDS, absent ones as None) and a short hash."""
    fields = {name: getattr(config, name, None) for name in spec.FINGERPRINT_FIELDS}
    return fields, fingerprint_sha(fields)


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
    # LoRA fine-tuning (options.LoraOptions.lora_record: rank, alpha, dropout, targets), or None: the
    # plan trains every weight. The cost model priced the frozen base; a run takes these options.
    lora: Optional[Dict] = None

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
                 "zero", "schedule", "execution", "lora", "predicted", "explanation", "alternatives"]
        return {k: d[k] for k in order if k != "lora" or d[k] is not None}  # no `lora` field without LoRA

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
        """A plan from its JSON document, checked in full: every field the compiler's report, inspect
        and the runtime read is present with the right type and range (`check_document`), the plan
        is consistent (`validate`) and its batch shape adds up (`check_batch`). Anything else raises
        a one-line PlanError naming `source`, the field and the fix."""
        check_document(d, source)
        stages = [Stage(index=s["index"], layers=list(s["layers"]), devices=list(s["devices"]),
                        embed=s.get("embed", False), head=s.get("head", False),
                        recompute=s.get("recompute", "none"),
                        chunks=[list(c) for c in s["chunks"]] if s.get("chunks") is not None else None)
                  for s in d["stages"]]
        plan = cls(model=d["model"], search_inputs=d["search_inputs"], plan_ngpus=d["plan_ngpus"],
                   mesh=dict(d["mesh"]), stages=stages, ops=d["ops"], zero=d["zero"],
                   schedule=d["schedule"], predicted=d["predicted"],
                   alternatives=d.get("alternatives", []), explanation=d.get("explanation", ""),
                   version=d["version"], execution=dict(d.get("execution", {})),
                   lora=dict(d["lora"]) if d.get("lora") is not None else None)
        plan.validate(source)
        plan.check_batch(source)
        return plan

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            what = "is a directory, not a plan file" if os.path.isdir(path) else "not found"
            raise PlanError(f"plan file {path} {what}; create it with `python train.py --run_mode compile ...` "
                            "or pass another --plan")
        return cls.from_dict(read_json(path, PlanError, "recompile the plan"), source=path)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, source="<plan>"):
        """Internal consistency: mesh product, stages covering the layers, known modes."""
        def bad(field_name, msg):
            raise PlanError(f"{source}: field `{field_name}`: {msg}; {RECOMPILE}")

        if not isinstance(self.mesh, dict) or list(self.mesh) != list(MESH_AXES):
            bad("mesh", f"axes must be {list(MESH_AXES)} in this order, got "
                        f"{list(self.mesh) if isinstance(self.mesh, dict) else self.mesh!r}")
        product = 1
        for axis, size in self.mesh.items():
            if not _is_int(size) or size < 1:
                bad(f"mesh.{axis}", f"size must be a positive integer, got {size!r}")
            product *= size
        if product != self.plan_ngpus:
            bad("mesh", f"sizes multiply to {product} but plan_ngpus is {self.plan_ngpus}")
        if len(self.stages) != self.mesh["pp"]:
            bad("stages", f"{len(self.stages)} stages but mesh.pp is {self.mesh['pp']}")
        fingerprint = self.model.get("fingerprint") if isinstance(self.model, dict) else None
        num_layers = fingerprint.get("num_hidden_layers") if isinstance(fingerprint, dict) else None
        if not isinstance(self.schedule, dict):
            bad("schedule", f"must be an object with name, micro_batches, virtual_stages, got {self.schedule!r}")
        interleaved = self.schedule.get("name") == "Interleaved1F1B"
        pp = self.mesh["pp"]
        per_stage = self.plan_ngpus // pp
        expected_start = 0
        for i, s in enumerate(self.stages):
            if s.index != i:
                bad(f"stages[{i}].index", f"expected {i}, got {s.index}")
            if s.recompute not in RECOMPUTE_MODES:
                bad(f"stages[{i}].recompute", f"{s.recompute!r} is not one of {RECOMPUTE_MODES}")
            if sorted(s.devices) != list(range(i * per_stage, (i + 1) * per_stage)):
                bad(f"stages[{i}].devices", f"stage {i} must hold devices {i * per_stage}..{(i + 1) * per_stage - 1}")
            if s.embed is not (i == 0) or s.head is not (i == pp - 1):
                bad(f"stages[{i}].embed", "the first stage (only) holds the embedding (embed: true) and the last "
                                          "(only) the head (head: true)")
            if interleaved:
                continue  # layers come in chunks, checked below
            if s.chunks is not None:
                bad(f"stages[{i}].chunks", "only an Interleaved1F1B plan lists chunks; set it to null")
            if len(s.layers) != 2 or s.layers[0] != expected_start or s.layers[1] < s.layers[0]:
                bad(f"stages[{i}].layers", f"{s.layers} does not continue from layer {expected_start}")
            expected_start = s.layers[1]
        v = self.schedule.get("virtual_stages", 1)
        if not _is_int(v) or v < 1:
            bad("schedule.virtual_stages", f"must be a positive integer, got {v!r}")
        if interleaved:
            if v < 2:
                bad("schedule.virtual_stages", f"an Interleaved1F1B plan has at least 2 virtual stages per stage, got {v}")
            if any(s.chunks is None or len(s.chunks) != v for s in self.stages):
                bad("stages[].chunks", f"an interleaved plan lists virtual_stages ({v}) chunks per stage")
            for k in range(pp * v):
                chunk = self.stages[k % pp].chunks[k // pp]
                if len(chunk) != 2 or chunk[0] != expected_start or chunk[1] <= chunk[0]:
                    bad(f"stages[{k % pp}].chunks", f"virtual stage {k} {chunk} does not continue "
                        f"from layer {expected_start}")
                expected_start = chunk[1]
            for i, s in enumerate(self.stages):
                if s.layers != [s.chunks[0][0], s.chunks[-1][1]]:
                    bad(f"stages[{i}].layers", f"{s.layers} must span the stage's chunks {s.chunks}")
        elif v != 1:
            bad("schedule.virtual_stages", f"only an Interleaved1F1B plan has virtual stages; it must be 1, got {v}")
        if num_layers is not None and expected_start != num_layers:
            bad("stages", f"layers end at {expected_start} but the model has {num_layers}")
        if not self.stages[0].embed or not self.stages[-1].head:
            bad("stages", "the first stage must hold the embedding and the last the head")
        if not isinstance(self.zero, dict) or _is_bool(self.zero.get("level")) or \
                self.zero.get("level") not in ZERO_LEVELS:
            bad("zero.level", f"{self.zero!r}: level must be one of {ZERO_LEVELS}")
        if not isinstance(self.zero.get("shard_over_replicas"), bool):
            bad("zero.shard_over_replicas", "must be true or false")
        if self.schedule.get("name") not in SCHEDULES:
            bad("schedule.name", f"{self.schedule.get('name')!r} is not one of {SCHEDULES}")
        if pp == 1 and self.schedule["name"] != "GradAccum":
            bad("schedule.name", "a plan without pipeline stages uses GradAccum")
        if pp > 1 and self.schedule["name"] == "GradAccum":
            bad("schedule.name", "a pipelined plan needs 1F1B or Interleaved1F1B")
        mb = self.schedule.get("micro_batches")
        if not _is_int(mb) or mb < 1:
            bad("schedule.micro_batches", f"must be a positive integer, got {mb!r}")
        if pp > 1 and mb < pp:
            bad("schedule.micro_batches", f"{mb} is fewer than the {pp} pipeline stages")
        if interleaved and mb % max(1, mb // pp):  # torch's ScheduleInterleaved1F1B runs rounds of equal size
            bad("schedule.micro_batches", f"{mb} cannot be run by Interleaved1F1B over {pp} stages: it must be a "
                                          f"multiple of its {mb // pp} rounds (micro_batches // pp)")
        self.op_partitions(source)
        peaks = self.predicted.get("peak_memory_gib")
        if not isinstance(peaks, list) or len(peaks) != self.plan_ngpus:
            bad("predicted.peak_memory_gib", f"must list one value per plan device ({self.plan_ngpus})")

    def check_batch(self, source="<plan>"):
        """The batch shape adds up: the global batch is micro_batch_size x schedule.micro_batches x the
        data-parallel ranks (dp x ep x replicas, replicas = runtime_ngpus / plan_ngpus), as the search
        made it and the runtime splits it (a micro-batch larger than a rank's share would leave ranks
        without data)."""
        inputs = self.search_inputs
        runtime = inputs["runtime_ngpus"]
        if runtime % self.plan_ngpus:
            raise PlanError(f"{source}: field `search_inputs.runtime_ngpus`: {runtime} is not a multiple of plan_ngpus "
                            f"({self.plan_ngpus}); {RECOMPILE}")
        micro, global_batch = inputs["micro_batch_size"], inputs["global_batch_size"]
        data_ranks = self.mesh["dp"] * self.mesh["ep"] * (runtime // self.plan_ngpus)
        where = (f"micro_batch_size {micro} x {data_ranks} data-parallel ranks (dp {self.mesh['dp']} x ep "
                 f"{self.mesh['ep']} x {runtime // self.plan_ngpus} replicas)")
        if micro > global_batch:
            raise PlanError(f"{source}: field `search_inputs.micro_batch_size`: {micro} exceeds global_batch_size "
                            f"{global_batch}; {RECOMPILE}")
        if global_batch % (micro * data_ranks):
            raise PlanError(f"{source}: field `search_inputs.global_batch_size`: {global_batch} is not a multiple of "
                            f"{where}; {RECOMPILE}")
        expected = global_batch // (micro * data_ranks)
        if self.schedule["micro_batches"] != expected:
            raise PlanError(f"{source}: field `schedule.micro_batches`: {self.schedule['micro_batches']}, but "
                            f"global_batch_size {global_batch} / ({where}) is {expected}; {RECOMPILE}")

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


def default_plan_path(model_name, plan_ngpus, plans_dir="plans", lora=False):
    """plans/<model>-<P>gpu.json, or -lora.json for a LoRA plan (which must not replace the plan that
    trains every weight)."""
    return os.path.join(plans_dir, f"{model_name}-{plan_ngpus}gpu{'-lora' if lora else ''}.json")


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
    if plan.lora is not None:
        lines.insert(4, f"  lora: rank {plan.lora['rank']}, alpha {plan.lora['alpha']:g}, dropout "
                        f"{plan.lora['dropout']:g} on {', '.join(plan.lora['targets'])}; the base weights frozen")
    return "\n".join(lines)

