"""Checks before any heavy work: find the plan, and refuse a run that does not fit it.

Everything here reads flags, files and the plan only (and takes the save directory's lock, and checks
that every node sees that directory); nothing builds a model or touches a device, so a mistake costs
a second, not a model load.
"""

import fcntl
import os
import secrets
import socket
import time

import torch.distributed as dist

from errors import UserError
from compiler.execution import cudagraph_refusal, unsupported
from compiler.plan import Plan, default_plan_path, model_fingerprint, model_name_of
from modeling.kernels import flash_attn_func
from options import ATTENTION_KERNELS, COMPILE_SCOPES, ExecutionOptions, RunOptions
from options import LORA_FIELDS, LoraOptions, parse_lora_targets
from runtime.mesh import node_identity


class RunError(UserError):
    """A run that must not start; the message names the flag or file and the fix."""


def find_plan(args: RunOptions, config):
    """(plan, path): --plan, or the plan in plans/ made for this model (by fingerprint) and --plan_ngpus,
    a LoRA plan exactly when the run gives --lora_rank (a run never turns into LoRA, or out of it, by a
    plan it did not name). A plan file that cannot be read is passed over in the lookup, so one bad
    file does not hide the others."""
    if args.plan:
        plan = Plan.load(args.plan)
        plan.check_model(config, source=args.plan)
        return plan, args.plan
    _, digest = model_fingerprint(config)
    if args.plan_ngpus is None:
        raise RunError("give --plan FILE or --plan_ngpus P (to find plans/<model>-<P>gpu.json)")
    preferred = default_plan_path(model_name_of(args.model_id), args.plan_ngpus, args.plans_dir, bool(args.lora_rank))
    try:
        listed = sorted(f for f in os.listdir(args.plans_dir) if f.endswith(".json"))
    except OSError:  # no plans directory (or an unreadable one): only the preferred path can exist
        listed = []
    candidates = [preferred] + [os.path.join(args.plans_dir, f) for f in listed]
    skipped = []
    for path in dict.fromkeys(candidates):  # the preferred file once, first
        if not os.path.isfile(path):
            continue
        try:
            plan = Plan.load(path)
        except Exception as e:  # any file that is not a valid plan (PlanError, or worse) is passed over
            skipped.append(f"{path} ({type(e).__name__})")
            continue
        if plan.model.get("fingerprint_sha") == digest and plan.plan_ngpus == args.plan_ngpus and \
                (plan.lora is not None) == bool(args.lora_rank):
            return plan, path
    unreadable = (f" (passed over {len(skipped)} unreadable plan file(s): {', '.join(skipped[:3])}"
                  f"{', ...' if len(skipped) > 3 else ''}; `python train.py --run_mode inspect --plan FILE` says why)"
                  if skipped else "")
    lora = f" --lora_rank {args.lora_rank}" if args.lora_rank else ""
    raise RunError(f"no {'LoRA ' if lora else ''}plan in {args.plans_dir}/ for this model with --plan_ngpus "
                   f"{args.plan_ngpus}{unreadable}; compile one with `python train.py --run_mode compile --model_id "
                   f"{args.model_id} --plan_ngpus {args.plan_ngpus} --runtime_ngpus {args.runtime_ngpus or args.plan_ngpus}"
                   f"{lora}` or pass --plan")


def check_run(args: RunOptions, plan: Plan, plan_path, world_size):
    """The run against the plan: devices, processes, batch shape, what the runtime can execute, and
    the execution options (the plan's, for each one the run leaves at its default)."""
    runtime = args.runtime_ngpus or world_size
    if plan.mesh["tp"] > 1 and plan.mesh["ep"] > 1:
        raise RunError(f"{plan_path}: tensor and expert parallelism together (mesh.tp = {plan.mesh['tp']}, mesh.ep = "
                       f"{plan.mesh['ep']}) cannot be executed by this version of the runtime; compile a plan with one "
                       "of them")
    if plan.mesh["tp"] > 1 and plan.zero["level"] > 0:
        raise RunError(f"{plan_path}: tensor parallelism with ZeRO level {plan.zero['level']} cannot be executed by "
                       "this version of the runtime (its gradient norm disagrees with a single process); compile a "
                       "plan with ZeRO 0 or without tensor parallelism")
    if plan.zero["level"] > 0 and not plan.zero["shard_over_replicas"] and runtime > plan.plan_ngpus:
        raise RunError(f"{plan_path}: ZeRO sharded within a replica (HSDP) is not supported by this version of the "
                       "runtime; compile the plan again (the search shards over the replicas)")
    plan.check_run(args.plan_ngpus, runtime, source=plan_path)
    check_batch_split(plan, runtime, plan_path)
    if args.tokenizer_path and not os.path.isdir(args.tokenizer_path):
        raise RunError(f"--tokenizer_path {args.tokenizer_path}: no such directory; pass the directory the "
                       "tokenizer was saved to (tokenizer.json, tokenizer_config.json)")
    if world_size != runtime:
        raise RunError(f"{world_size} processes were started but --runtime_ngpus is {runtime}; start "
                       f"`torchrun --nproc_per_node {runtime}` or change --runtime_ngpus")
    adopt_plan_execution(args, plan)
    check_execution(args, plan, plan_path, runtime)
    for flag, value, planned in (("--seq_len", args.seq_len, plan.search_inputs["seq_len"]),
                                 ("--micro_batch_size", args.micro_batch_size, plan.search_inputs["micro_batch_size"]),
                                 ("--global_batch_size", args.global_batch_size,
                                  plan.search_inputs["global_batch_size"])):
        if value is not None and value != planned:
            raise RunError(f"{flag} {value} differs from the {planned} the plan {plan_path} was compiled for; "
                           "recompile the plan with the new value or leave the flag out")
    planned_masking = bool(plan.search_inputs.get("document_masking", False))
    if args.document_masking is not None and bool(args.document_masking) != planned_masking:
        raise RunError(f"--document_masking {'on' if args.document_masking else 'off'} differs from the plan "
                       f"{plan_path}, compiled with it {'on' if planned_masking else 'off'}; recompile the plan with "
                       "the value you want or leave the flag out")


def check_batch_split(plan: Plan, runtime, plan_path):
    """The rule compile applies (compiler/search.py), for the devices of this run: its data ranks
    (replicas x dp x ep, each reading its own slice of the global batch) split the global batch into
    whole micro-batches; and a pipeline runs the micro-batches per step its schedule was compiled
    for. Otherwise each rank's rows would be rounded down while the loss is divided as if all were
    used: a run that exits 0 with a wrong loss."""
    global_batch, micro = plan.search_inputs["global_batch_size"], plan.search_inputs["micro_batch_size"]
    dp, ep = plan.mesh["dp"], plan.mesh["ep"]
    replicas = runtime // plan.plan_ngpus
    data_ranks = replicas * dp * ep
    if global_batch % (micro * data_ranks):
        fits = [k * plan.plan_ngpus for k in range(1, global_batch // (micro * dp * ep) + 1)
                if global_batch % (micro * dp * ep * k) == 0]
        use = f"use --runtime_ngpus {' or '.join(map(str, fits))}, or " if fits else ""
        raise RunError(f"--runtime_ngpus {runtime}: its {data_ranks} data-parallel ranks ({replicas} replica(s) x dp "
                       f"{dp} x ep {ep}) do not split the global batch of {global_batch} sequences of {plan_path} into "
                       f"whole micro-batches of {micro} (it must be a multiple of {micro} x {data_ranks}, as compile "
                       f"requires); {use}recompile the plan with --runtime_ngpus {runtime} and a --global_batch_size "
                       f"that is a multiple of {micro * data_ranks}")
    per_pipeline = global_batch // (micro * data_ranks)
    if plan.mesh["pp"] > 1 and per_pipeline != plan.schedule["micro_batches"]:
        compiled = plan.search_inputs.get("runtime_ngpus")
        raise RunError(f"--runtime_ngpus {runtime}: each of the {data_ranks} pipeline(s) would run {per_pipeline} "
                       f"micro-batches per step, but the schedule of {plan_path} was compiled for "
                       f"{plan.schedule['micro_batches']}" + (f" (at --runtime_ngpus {compiled})" if compiled else "")
                       + f"; {f'use --runtime_ngpus {compiled}, or ' if compiled else ''}recompile the plan with "
                       f"--runtime_ngpus {runtime}")


# ---- the save directory ------------------------------------------------------------------------------------
LOCK_FILE = ".run.lock"  # in --save_dir: held (flock) by rank 0 of the run that writes there
_held = {}               # real path of a save directory -> the open lock file of this process


def claim_save_dir(save_dir, rank):
    """--save_dir checked and locked by rank 0 before any heavy work, the verdict sent to every rank
    (one collective) so that all refuse together: a directory (created if missing) that can be
    written and that no other run is using. The lock lasts as long as rank 0's process; the kernel
    releases it when the process ends, however it ends."""
    problem = None
    if rank == 0:
        try:
            check_save_dir(save_dir)
            lock_save_dir(save_dir)
        except RunError as e:
            problem = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        raise RunError(problem)


def check_save_dir(save_dir):
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise RunError(f"--save_dir {save_dir} is a file, not a directory; pass a directory (it is created if "
                       "missing)")
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"--save_dir {save_dir} cannot be created ({e.strerror}); pass a directory you can write")
    if not os.access(save_dir, os.W_OK | os.X_OK):
        raise RunError(f"--save_dir {save_dir} is not writable; make it writable or pass another --save_dir")


def lock_save_dir(save_dir):
    """An exclusive lock on `save_dir` for this process (re-entrant within it); refused, naming the
    holder, while another process holds it."""
    key = os.path.realpath(save_dir)
    if key in _held:
        return
    path = os.path.join(save_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"--save_dir {save_dir} is not writable ({path}: {e.strerror}); make it writable or pass "
                       "another --save_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(f"--save_dir {save_dir} is in use by another run ({holder}, lock {path}); wait for it to end "
                       "or stop it, or pass another --save_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[key] = fd


def release_save_dirs():
    """The locks this process holds, released (at the end of a run; the kernel does it at exit anyway)."""
    while _held:
        os.close(_held.popitem()[1])


# ---- one save directory for every node ---------------------------------------------------------------------
# A checkpoint is written by every rank into its own --save_dir and committed by rank 0 once it has
# checksummed every rank's files there; a resume reads `last` and the shards on every rank. So every
# rank must see the same directory: on several machines, a filesystem they all mount. Each rank
# proves it by writing a token that rank 0 then looks for.
TOKEN_PREFIX = ".rank-token."  # in --save_dir: <prefix><run nonce>.<rank>, removed once read
TOKEN_WAIT_S = 5.0             # how long rank 0 waits for a token a filesystem shows late


def check_save_dir_shared(save_dir, rank):
    """Refuses (on every rank, one line naming the node and the fix) a multi-process run in which some
    rank's --save_dir is not the directory rank 0 sees: another path, or the same path on a disk of
    its own machine. Called after claim_save_dir, so rank 0 holds the lock and this run's tokens are
    the only live ones. The tokens carry a nonce drawn by rank 0 for this run, so tokens a killed run
    left behind never pass for this run's: rank 0 deletes the ones it can list, but a network
    filesystem may serve it a cached listing; and each name is new to rank 0, so no cached lookup of
    that name can hide a token either."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    nonce = [None]
    if rank == 0:
        _remove_tokens(save_dir)  # of runs killed between writing and removing theirs
        nonce = [secrets.token_hex(8)]
    dist.broadcast_object_list(nonce, src=0)
    nonce = nonce[0]
    token = os.path.join(save_dir, f"{TOKEN_PREFIX}{nonce}.{rank}")
    created = not os.path.isdir(save_dir)  # a node with a disk of its own makes a directory nobody wants
    error = None
    try:
        os.makedirs(save_dir, exist_ok=True)
        with open(token, "w") as f:
            f.write(_token_text(nonce, rank))
    except OSError as e:
        error = e.strerror or str(e)
    node, host = node_identity()
    # the gather is the barrier between writing and reading: rank 0 looks only once every rank has written
    seen = [None] * world
    dist.all_gather_object(seen, {"rank": rank, "node": node, "host": host, "save_dir": os.path.abspath(save_dir),
                                  "error": error})
    verdict = [_unshared_save_dir(save_dir, nonce, seen) if rank == 0 else None]
    dist.broadcast_object_list(verdict, src=0)  # once it returns, rank 0 has read every token
    try:
        os.remove(token)
    except OSError:
        pass
    if verdict[0]:
        # The rank that made the directory saw it missing before making it, so it is among those with
        # `created`; once every token is gone (the barrier) its rmdir finds the directory empty.
        dist.barrier()
        if created:
            try:
                os.rmdir(save_dir)
            except OSError:
                pass
        raise RunError(verdict[0])


def _token_text(nonce, rank):
    return f"{nonce} {rank}\n"


def _token_present(save_dir, nonce, rank):
    try:
        with open(os.path.join(save_dir, f"{TOKEN_PREFIX}{nonce}.{rank}")) as f:
            return f.read() == _token_text(nonce, rank)
    except OSError:
        return False


def _remove_tokens(save_dir):
    try:
        stale = [n for n in os.listdir(save_dir) if n.startswith(TOKEN_PREFIX)]
    except OSError:
        return
    for name in stale:
        try:
            os.remove(os.path.join(save_dir, name))
        except OSError:
            pass


def _unshared_save_dir(save_dir, nonce, seen):
    """Rank 0: None when every rank's token is in its --save_dir, else the refusal, naming each node
    whose ranks wrote elsewhere or could not write."""
    pending = [s for s in seen if s["error"] is None]
    deadline = time.monotonic() + TOKEN_WAIT_S
    while True:
        pending = [s for s in pending if not _token_present(save_dir, nonce, s["rank"])]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    faults = {}  # (node, host, its save_dir, its write error) -> its ranks at fault
    for s in sorted([s for s in seen if s["error"] is not None] + pending, key=lambda s: s["rank"]):
        faults.setdefault((s["node"], s["host"], s["save_dir"], s["error"]), []).append(s["rank"])
    if not faults:
        return None
    here = seen[0]
    said = []
    for (node, host, path, error), ranks in faults.items():
        who = f"node {node} (host {host}, rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
        said.append(f"{who} cannot write its --save_dir {path} ({error})" if error else
                    f"{who} writes its --save_dir {path} but its files are not in rank 0's {here['save_dir']} "
                    f"(node {here['node']}, host {here['host']})")
    return (f"--save_dir is not one directory for every node: {'; '.join(said)}; every rank writes its checkpoint "
            "shards there and rank 0 commits them, so each node would hold only part of a checkpoint: put "
            "--save_dir on a filesystem shared by every node (NFS, Lustre, ...), writable by the run, and give every node "
            "the same path")

def compute_dtype_name(args: RunOptions):
    return args.dtype or ("bf16" if args.device == "cuda" else "fp32")


def adopt_plan_execution(args: RunOptions, plan: Plan):
    """The execution options the plan was costed with, for each one this run leaves at its default."""
    defaults = ExecutionOptions()
    for name, value in ExecutionOptions.from_plan(plan.execution).costed().items():
        if getattr(args, name) == getattr(defaults, name):
            setattr(args, name, value)


def check_execution(args: RunOptions, plan: Plan, plan_path, devices=None):
    """The execution options against the plan, the compute dtype and the run's `devices` (default: its
    --runtime_ngpus, else the plan's devices)."""
    if args.attention is not None and args.attention not in ATTENTION_KERNELS:
        raise RunError(f"--attention {args.attention}: choose one of {', '.join(ATTENTION_KERNELS)}")
    if args.compile not in COMPILE_SCOPES:
        raise RunError(f"--compile {args.compile}: choose one of {', '.join(COMPILE_SCOPES)}")
    if args.attention == "flash" and flash_attn_func is None:
        raise RunError("--attention flash needs the flash-attn package, which is not installed; use "
                       "--attention sdpa_flash_padded (PyTorch's own flash kernel) or sdpa")
    if args.ce_chunk_tokens < 0:
        raise RunError(f"--ce_chunk_tokens must be 0 (plain loss) or positive, got {args.ce_chunk_tokens}")
    # the one rule of what the runtime executes, which the search also obeys
    reason = unsupported(args.execution(), plan.mesh["pp"], plan.zero["level"], compute_dtype_name(args))
    if reason:
        raise RunError(f"{plan_path}: {reason}; drop the flag (--dtype bf16 for compiled layers) or recompile the plan")
    devices = devices or args.runtime_ngpus or plan.plan_ngpus
    reason = cudagraph_refusal(args.compile, devices, plan.lora is not None, args.compile_backend, args.device)
    if reason:
        raise RunError(reason)


# ---- the data against the plan -----------------------------------------------------------------------------
def check_document_masking(plan: Plan, plan_path, rows, flag, dataset_path):
    """A dataset whose rows pack several documents (position ids restarting at 0 inside a row, so the
    model attends within each document) runs only under a plan compiled for it: document-masked
    attention computes every score of its S x S mask (no causal skipping), which a plan without
    `search_inputs.document_masking` did not cost. The reverse (a plan for packed rows, plain rows)
    only overestimates, and runs."""
    if rows.has_restarts() and not plan.search_inputs.get("document_masking", False):
        raise RunError(f"{flag} {dataset_path} packs several documents per row (its position_ids restart at 0 inside "
                       f"rows) but the plan {plan_path} was compiled without document masking "
                       "(search_inputs.document_masking is not true), so it did not cost the masked attention; "
                       "recompile the plan with --document_masking on")


# ---- LoRA: the plan's -------------------------------------------------------------------------------------
def adopt_plan_lora(args: RunOptions, plan: Plan, plan_path):
    """The run's LoRA options are the plan's (`plan.lora`, which the cost model priced: frozen base,
    trainable adapters): each one the run leaves at its default takes the plan's value, and one the
    run sets to another value is refused. A plan without `lora` trains every weight."""
    defaults = LoraOptions()
    if plan.lora is None:
        if args.lora_rank:
            raise RunError(f"--lora_rank {args.lora_rank}: the plan {plan_path} was compiled without LoRA (it trains "
                           f"every weight); recompile it with --lora_rank {args.lora_rank} (and the other --lora_* "
                           "flags) or leave the LoRA flags out")
        return
    for key, name in LORA_FIELDS.items():
        planned = ",".join(plan.lora[key]) if key == "targets" else plan.lora[key]
        value = getattr(args, name)
        if value == getattr(defaults, name):
            setattr(args, name, planned)
            continue
        same = (parse_lora_targets(value) == tuple(plan.lora[key])) if key == "targets" else value == planned
        if not same:
            raise RunError(f"--{name} {value} differs from the {planned} the plan {plan_path} was compiled for; leave "
                           "the flag out (the plan's is used) or recompile the plan with it")
    if plan.mesh["tp"] > 1 and args.lora_dropout > 0:
        raise RunError(f"{plan_path}: --lora_dropout {args.lora_dropout} with tensor parallelism (mesh.tp = "
                       f"{plan.mesh['tp']}) cannot be executed (the ranks' dropout masks of one input would differ); "
                       "recompile the plan (the search then leaves tensor parallelism out) or use --lora_dropout 0")
