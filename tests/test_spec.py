"""The model spec's op families, and the plan's `ops` checked against them (Plan.op_partitions)."""

import json

import pytest

from compiler.annotations import parse_annotation
from compiler.plan import Plan, PlanError, Stage, fingerprint_sha
from modeling import spec


@pytest.mark.parametrize("name", sorted(spec.OP_FAMILIES))
def test_family_annotation_parses_and_each_partition_splits_a_splittable_dim(name):
    family = spec.OP_FAMILIES[name]
    assert family.name == name
    annotation = parse_annotation(family.annotation)
    assert family.partitions[0] == "replicate" and len(set(family.partitions)) == len(family.partitions)
    for partition, dim in family.splits.items():
        assert dim in annotation.names(), f"{name}.{partition}: dim {dim!r} not in {family.annotation!r}"
        assert dim in annotation.splittable_names(), f"{name}.{partition}: dim {dim!r} is marked ^"
    # the partition an axis uses is one the family declares
    for axis_partition in (family.tensor_parallel, family.expert_parallel):
        assert axis_partition is None or axis_partition in family.splits


def _plan(tp=1, ep=1, ops=None):
    """A valid one-stage plan on tp x ep devices, with `ops` (default: what the mesh gives each family)."""
    ngpus = tp * ep
    if ops is None:
        ops = {name: {"partition": p} for name, p in spec.partitions_for_mesh(tp, ep).items()}
    # a complete plan (Plan.from_dict checks every field the runtime reads): batch 1 x ep data ranks
    return Plan(model={"name": "m", "fingerprint": {"num_hidden_layers": 2},
                       "fingerprint_sha": fingerprint_sha({"num_hidden_layers": 2})},
                search_inputs={"seq_len": 16, "micro_batch_size": 1, "global_batch_size": ep, "runtime_ngpus": ngpus,
                               "device_profile": "cpu", "mem_limit_gib": 8.0}, plan_ngpus=ngpus,
                mesh={"pp": 1, "dp": 1, "ep": ep, "tp": tp},
                stages=[Stage(index=0, layers=[0, 2], devices=list(range(ngpus)), embed=True, head=True)],
                ops=ops, zero={"level": 0, "shard_over_replicas": False},
                schedule={"name": "GradAccum", "micro_batches": 1, "virtual_stages": 1},
                predicted={"step_time_s": 1.0, "peak_memory_gib": [1.0] * ngpus})


def _reloaded(plan):
    return Plan.from_dict(json.loads(plan.to_json()), source="p.json")


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2)])
def test_op_partitions_of_a_valid_plan(tp, ep):
    plan = _reloaded(_plan(tp, ep))
    assert plan.op_partitions() == spec.partitions_for_mesh(tp, ep)
    # a family without an entry is replicated; annotated custom-op entries are not families
    plan.ops = {"deepseek::moe_route": {"annotation": "n -> n"}}
    plan.validate()
    assert set(plan.op_partitions().values()) == {"replicate"}
    assert list(plan.op_partitions()) == list(spec.OP_FAMILIES)


@pytest.mark.parametrize("family,partition", [("norm", "heads"), ("attention", "intermediate"),
                                              ("experts", "rows"), ("embed", None)])
def test_a_partition_the_family_does_not_declare_is_refused(family, partition):
    plan = _plan(tp=2)
    plan.ops[family] = {"partition": partition}
    with pytest.raises(PlanError, match=rf"p\.json: field `ops\.{family}\.partition` is {partition!r}; "
                                        rf"the {family} family admits"):
        _reloaded(plan)


@pytest.mark.parametrize("family,partition,axis", [("attention", "heads", "tp"), ("dense_mlp", "intermediate", "tp"),
                                                   ("experts", "intermediate", "tp"), ("experts", "expert", "ep")])
def test_a_partition_needing_an_axis_of_size_1_is_refused(family, partition, axis):
    other = {"tp": "ep", "ep": "tp"}[axis]
    plan = _plan(**{other: 2})  # the other axis is there, the needed one is not
    plan.ops[family] = {"partition": partition}
    with pytest.raises(PlanError, match=rf"field `ops\.{family}\.partition` is '{partition}', which splits over "
                                        rf"the {axis} axis, but mesh\.{axis} is 1; set the partition to replicate"):
        _reloaded(plan)


def test_an_ops_key_that_is_no_family_is_refused():
    plan = _plan()
    plan.ops["lm_head"] = {"partition": "replicate"}  # the name before the families were the spec's
    with pytest.raises(PlanError, match=r"field `ops\.lm_head` is not an op family of the model"):
        _reloaded(plan)
