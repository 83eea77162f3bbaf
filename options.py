"""Every option of the pipeline, declared once.

Each option is a dataclass field with its default and its help text; `train.py`'s flags are
generated from these fields (`add_flags`, `from_flags`), the runtime takes a `RunOptions`, the
compiler a `CompileOptions`, and a plan records the `ExecutionOptions` it was costed with, which the
cost model prices and the run executes. A default therefore lives here and nowhere else.

    ExecutionOptions   how a step is computed (attention kernel, compiled layers, chunked loss,
                       AdamW kind, gradient-sync policy, ZeRO-3 units kept gathered): changes speed
                       and memory, not the result
    PlanOptions        which plan: the model, devices, batch shape, device profile, memory limit
    LoraOptions        LoRA fine-tuning (rank, alpha, dropout, targets): recorded in the plan
    CompileOptions     PlanOptions + ExecutionOptions + LoraOptions + what compile writes
    RunOptions         PlanOptions + ExecutionOptions + LoraOptions + the training loop, checkpoints
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from errors import UserError
from modeling.kernels import ATTENTION_BACKENDS
from modeling.lora import DEFAULT_LORA_TARGETS, LORA_TARGETS, LoraConfig, parse_targets as parse_lora_targets
from modeling.training_form import COMPILE_SCOPES

# which argparse group a flag is listed under in --help
GROUPS = {
    "model": "model and data",
    "plan": "parallel plan",
    "train": "training",
    "execution": "execution (how a step is computed: speed and memory, not the result; each measured by "
                 "bench/train_step.py). Given to compile, they are recorded in the plan and costed; a run uses "
                 "the plan's unless it sets its own. Unset everywhere: the plain path",
    "lora": "LoRA fine-tuning (given to compile, recorded in the plan and costed; a run takes the plan's, and a "
            "value other than the plan's is refused)",
}


def option(default, help, group, *, choices=None, flag=None, cli=True, parse=None):
    """A dataclass field that is also a train.py flag. flag: the flag's name if not --<field>
    (a boolean whose flag turns it off, e.g. --no_final_save). cli=False: an option of the API
    (tests, benchmarks) that has no flag. parse: how the flag's text becomes the value (default: by
    the field's type)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "flag": flag,
                                            "cli": cli, "parse": parse})


def on_off(text):
    if text in ("on", "true", "1"):
        return True
    if text in ("off", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: give on or off")


def count_or_auto(text):
    """A positive number, or "auto" (the compiler chooses)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive integer nor auto") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer or auto")
    return value


# ---- values ---------------------------------------------------------------------------------------------
# The range of each numeric option (flag --<name>): validate() refuses a value outside it, NaN and
# infinity with one line naming the flag. An option not listed is checked only for being finite.
LEAST = {"plan_ngpus": 1, "runtime_ngpus": 1, "seq_len": 2, "micro_batch_size": 1, "global_batch_size": 1,
         "ce_chunk_tokens": 0, "plan_rank": 1, "max_steps": 0, "lr": 0.0, "weight_decay": 0.0, "warmup_steps": 0,
         "seed": 0, "save_every": 0, "zero3_keep_gathered": 0, "expert_load_imbalance": 1.0}
ABOVE = {"mem_limit_gib": 0.0}   # strictly greater than
MOST = {"seed": 2**32 - 1}       # the data order and initial values are seeded with seed * 1e6 + ..., in 64 bits
LEAST.update(min_lr=0.0, eval_every=0)  # the learning-rate schedule's floor; evaluation period


class OptionError(UserError):
    """An option's value that cannot be used; the message names the flag and the range."""


class Options:
    """What the option dataclasses share: the check of their values."""

    def validate(self):
        """Every numeric option finite and in its range (LEAST, ABOVE, MOST); returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # unset (None), a choice, or "auto"
            flag = f.metadata.get("flag") or f"--{f.name}"
            default = f" (default {f.default})" if f.default is not None else ""
            if value != value or value in (float("inf"), float("-inf")):
                raise OptionError(f"{flag} {value}: give a finite number{default}")
            least, above, most = LEAST.get(f.name), ABOVE.get(f.name), MOST.get(f.name)
            if (least is not None and value < least) or (above is not None and value <= above) or \
                    (most is not None and value > most):
                wanted = (f"> {above}" if above is not None else f">= {least}" if most is None
                          else f"from {least} to {most}")
                raise OptionError(f"{flag} {value}: must be {wanted}{default}")
        return self


ATTENTION_KERNELS = tuple(ATTENTION_BACKENDS)


@dataclass
class ExecutionOptions(Options):
    attention: Optional[str] = option(
        None, "attention kernel: sdpa lets PyTorch choose; sdpa_flash_padded forces its flash kernel (MLA's "
              "128-wide values zero-padded to the 192-wide query/key head); sdpa_efficient, sdpa_cudnn force "
              "those kernels (CUDA only); flex runs packed documents through FlexAttention on CUDA (whole rows as "
              "sdpa); flash needs the flash-attn package. Unset: flash if installed, else sdpa",
        "execution", choices=ATTENTION_KERNELS)
    compile: str = option(
        "none", "torch.compile of each decoder layer's forward (layer), the same with the routed experts left "
                "eager (layer_eager_experts), the same as layer replayed as CUDA graphs (layer_cudagraphs: one "
                "device, LoRA, CUDA; chosen by the search where the device profile measured its gain), or only RMSNorm and RoPE as fused kernels "
                "(norm_rope); needs bf16 compute; the first step includes the compile time", "execution",
        choices=COMPILE_SCOPES)
    ce_chunk_tokens: int = option(
        0, "compute the cross-entropy from the final hidden states this many positions at a time, never "
           "holding the full float32 logits (0: the plain loss over full logits; with pipeline stages the last "
           "stage computes it)",
        "execution")
    fused_adamw: bool = option(False, "AdamW's fused kernel instead of the foreach one", "execution")
    defer_grad_sync: bool = option(
        False, "ZeRO 0 plans: accumulate gradients over the step's micro-batches (float32) and reduce them once, "
               "keeping the bf16 weight copies gathered in between", "execution")
    zero3_keep_gathered: int = option(
        0, "ZeRO 3 plans without pipeline stages: the last K FSDP units to run their forward keep their gathered "
           "bf16 weights until their backward (FSDP2 reshard_after_forward=False): first the model's own "
           "parameters (embedding, final norm, head), then the decoder layers from the last. Each unit kept needs "
           "one all-gather fewer per micro-batch and holds its gathered copy in between (0: every unit resharded "
           "after its forward, plain ZeRO 3)", "execution")

    # The options that change a step's cost, as a plan records them; the search chooses each one the
    # user does not give (compiler/execution.py).
    COSTED = ("attention", "compile", "ce_chunk_tokens", "fused_adamw", "defer_grad_sync", "zero3_keep_gathered")

    def costed(self):
        """The cost-relevant options that differ from the plain path: a plan's `execution` field."""
        defaults = ExecutionOptions()
        return {name: getattr(self, name) for name in self.COSTED if getattr(self, name) != getattr(defaults, name)}

    @classmethod
    def from_plan(cls, recorded, source="<plan>"):
        """The options a plan's `execution` field records (the others at their defaults)."""
        recorded = recorded or {}
        unknown = sorted(set(recorded) - set(cls.COSTED))
        if unknown:
            raise UserError(f"{source}: field `execution` has unknown option(s) {unknown}; known: "
                            f"{list(cls.COSTED)}; recompile the plan")
        return cls(**recorded)

    def execution(self):
        """Just the execution options of a larger options object."""
        return ExecutionOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ExecutionOptions)})


@dataclass
class PlanOptions(Options):
    model_id: Optional[str] = option(
        None, "a local directory with config.json (and optionally HF weights), e.g. configs/tiny-deepseek-v2, "
              "or a Hugging Face hub id", "model")
    trust_remote_code: bool = option(
        False, "let a hub --model_id run its own Python code (transformers' trust_remote_code) to read its config; "
               "without it only the repository's config.json is downloaded and read as data, and no code from the "
               "hub runs", "model")
    plan_ngpus: Optional[int] = option(None, "devices one copy of the plan spans", "plan")
    runtime_ngpus: Optional[int] = option(
        None, "devices of the run; a multiple of --plan_ngpus, the plan being replicated runtime_ngpus / "
              "plan_ngpus times (default: --plan_ngpus)", "plan")
    plan: Optional[str] = option(None, "plan file to run or inspect (default: found in plans/ by model and P)",
                                 "plan")
    seq_len: Optional[int] = option(
        None, "tokens per sequence (compile: default 2048; run: the plan's, and a different value is refused)",
        "model")
    micro_batch_size: Optional[int] = option(
        None, "sequences per micro-batch (compile: default 4, or auto: the search chooses among the divisors of "
              "the global batch; run: the plan's, and a different value is refused)", "train", parse=count_or_auto)
    global_batch_size: Optional[int] = option(
        None, "sequences per optimizer step (compile: default 64; run: the plan's, and a different value is "
              "refused)", "train")
    plans_dir: str = option("plans", "where compiled plans are written and looked up", "plan", cli=False)
    document_masking: Optional[bool] = option(
        None, "on|off: the rows pack several documents (instruction data: position_ids restart at 0 inside a row), so "
              "attention is block-causal within each document (the documents regrouped for the causal kernel); "
              "compile costs that (default off), a run of packed rows needs a plan compiled with it on, and a run "
              "given the flag must agree with its plan", "plan", parse=on_off)


@dataclass
class LoraOptions(Options):
    """LoRA fine-tuning: adapters of rank lora_rank on the projections of the lora_targets families
    (modeling/lora.py), the base weights frozen in the compute dtype."""

    lora_rank: int = option(
        0, "LoRA: train rank-R adapters on the projections of --lora_targets over frozen base weights, which stay "
           "in the compute dtype with no fp32 copy, gradient or optimizer state (0: train every weight)", "lora")
    lora_alpha: float = option(16.0, "LoRA scaling numerator: each update is scaled by alpha / rank", "lora")
    lora_dropout: float = option(0.0, "dropout on the adapters' input in training, from 0 to below 1", "lora")
    lora_targets: str = option(
        DEFAULT_LORA_TARGETS, "comma list of the op families whose projections get adapters, among "
                              f"{', '.join(LORA_TARGETS)} (experts: per-expert adapters, stacked; the router, "
                              "embeddings, norms and head are never adapted)", "lora")

    def validate(self):
        super().validate()
        if not self.lora_dropout < 1.0:
            raise OptionError(f"--lora_dropout {self.lora_dropout}: must be from 0 to below 1 (default 0.0)")
        try:
            parse_lora_targets(self.lora_targets)
        except ValueError as e:
            raise OptionError(f"--lora_targets {self.lora_targets}: {e}") from None
        return self

    def lora_record(self):
        """The plan's and checkpoint's `lora` record of these options, or None without LoRA."""
        if not self.lora_rank:
            return None
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets).record()


# the plan's `lora` record (and lora.json) field -> the option that sets it
LORA_FIELDS = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "lora_targets"}
LEAST.update(lora_rank=0, lora_dropout=0.0)
ABOVE.update(lora_alpha=0.0)


COMPILE_DEFAULTS = {"seq_len": 2048, "micro_batch_size": 4, "global_batch_size": 64}


@dataclass
class CompileOptions(PlanOptions, ExecutionOptions, LoraOptions):
    plan_out: Optional[str] = option(None, "where compile writes the plan (default plans/<model>-<P>gpu.json, or -lora.json with --lora_rank)",
                                     "plan")
    plan_rank: int = option(
        1, "compile: write the K-th best plan instead of the best (2 = the first runner-up), to measure the "
           "search's ranking", "plan")
    mem_limit_gib: float = option(64.0, "memory limit per device for the search", "plan")
    device_profile: str = option("h100", "h100, h200, cpu, or a profile JSON file, for the cost model", "plan")
    report: bool = option(True, "write the Markdown and PNG report beside the plan", "plan", cli=False)
    # execution options the search must not change (the flags given; options.ExecutionOptions fields)
    pinned: tuple = option((), "execution options given as flags", "execution", cli=False)
    compute_dtype: Optional[str] = option(
        None, "bf16 (default on GPUs) or fp32 (default for the cpu profile)", "plan", cli=False)
    expert_load_imbalance: Optional[float] = option(
        None, "expert-parallel plans: the busiest expert rank's routed slots over the mean rank's (>= 1; it sets the "
              "pace of the expert GEMMs and of the all-to-all; bench/expert_imbalance.py measures it). Recorded in the "
              "plan's search_inputs (default: the device profile's, by expert-parallel degree)", "plan")

    def __post_init__(self):
        for name, default in COMPILE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)


@dataclass
class RunOptions(PlanOptions, ExecutionOptions, LoraOptions):
    dataset_path: Optional[str] = option(
        None, "a dataset saved by bookcorpus.py (column input_ids; with --format sft also labels, -100 where a token "
              "is no target, and position_ids, restarting at 0 at each packed example)", "model")
    eval_dataset_path: Optional[str] = option(
        None, "a dataset like --dataset_path (same sequence length) to evaluate on: the mean cross-entropy over its "
              "targets (response tokens for instruction data), forward only, every --eval_every steps and after the "
              "last step, logged as eval_loss", "model")
    eval_every: int = option(0, "evaluate on --eval_dataset_path every N steps (0: only after the last step)",
                             "train")
    tokenizer_path: Optional[str] = option(
        None, "directory whose tokenizer files are kept with each checkpoint, for merge_ckpt.py (default: the "
              "tokenizer files of --model_id, if it has any)", "model")
    max_steps: int = option(1000, "optimizer steps to run", "train")
    lr: float = option(3e-4, "peak learning rate (AdamW, betas 0.9 / 0.95); on --resume_path this flag, not the "
                             "checkpoint, sets it (resume with a lower --lr to lower it)", "train")
    weight_decay: float = option(0.1, "AdamW weight decay; on --resume_path this flag, not the checkpoint, sets it",
                                 "train")
    warmup_steps: int = option(100, "linear warmup steps (counted from step 0 of the run's lineage: a resumed run "
                                    "continues the schedule at its step); on --resume_path this flag sets it",
                               "train")
    lr_scheduler: str = option(
        "constant", "learning rate after the warmup: constant at --lr, or a cosine or linear decay from --lr to "
                    "--min_lr over the steps after the warmup, reaching it at --max_steps (a resumed run continues "
                    "the schedule at its step)", "train", choices=("constant", "cosine", "linear"))
    min_lr: float = option(0.0, "the learning rate that --lr_scheduler cosine or linear decays to, at most --lr",
                           "train")
    seed: int = option(0, "seed of initialisation and data order", "train")
    device: str = option("cuda", "cuda (NCCL) or cpu (gloo)", "train", choices=("cuda", "cpu"))
    dtype: Optional[str] = option(
        None, "compute dtype; master weights and optimizer state stay fp32 (default: bf16 on cuda, fp32 on cpu)",
        "train", choices=("bf16", "fp32"))
    save_dir: str = option("checkpoints", "checkpoints, metrics.jsonl, TensorBoard", "train")
    save_every: int = option(0, "save a sharded checkpoint every N steps (0: only after the last step)", "train")
    final_save: bool = option(True, "do not save a checkpoint after the last step (saved by default)", "train",
                              flag="--no_final_save")
    keep_last: Optional[int] = option(
        None, "after each save keep the newest K (>= 1) checkpoints of its lineage (it, the one it continued, and "
              "so on back) and delete that lineage's older ones; the checkpoint the run resumed from and ones of "
              "other lineages (another run's, or steps after the one resumed from) are never deleted (default: keep "
              "all)", "train")
    resume_path: Optional[str] = option(
        None, "resume from a checkpoint directory, or `last` for the one --save_dir's `last` pointer names. Every "
              "file's size and CRC-32 is checked first, and nothing in it is run as code. The checkpoint restores "
              "weights, AdamW moments, the step (so the data position and the LR schedule's position) and RNG "
              "states; the flags set the hyperparameters (--lr, --weight_decay, --warmup_steps). --max_steps is "
              "the total, and must exceed the checkpoint's step", "train")
    progress: bool = option(True, "show a progress bar on rank 0", "train", cli=False)
    compile_backend: str = option("inductor", "torch.compile backend (aot_eager for CPU tests)", "execution",
                                  cli=False)


# ---- argparse ------------------------------------------------------------------------------------------
def _flag_fields(*classes):
    seen = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") and f.name not in seen:
                seen[f.name] = f
    return list(seen.values())


def add_flags(parser, *classes):
    """One flag per option of `classes` (each once), in argparse groups; defaults stay None so that
    `from_flags` can tell a flag given from one left out."""
    fields = _flag_fields(*classes)
    used = {f.metadata["group"] for f in fields}
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items() if name in used}
    for f in fields:
        group = groups[f.metadata["group"]]
        flag = f.metadata["flag"] or f"--{f.name}"
        help_text = f.metadata["help"]
        if f.type in (bool, "bool") and (f.metadata["group"] == "execution" or f.metadata["parse"] is on_off):
            # `--fused_adamw` turns it on, `--fused_adamw off` pins it off (compile would search it)
            group.add_argument(flag, dest=f.name, nargs="?", const=True, default=None, type=on_off,
                               metavar="on|off", help=help_text + " (flag alone: on)")
            continue
        if f.type in (bool, "bool"):
            action = "store_false" if flag.startswith("--no_") else "store_true"
            group.add_argument(flag, dest=f.name, action=action, default=None, help=help_text)
            continue
        kind = f.metadata["parse"] or {"int": int, "float": float}.get(_base_type(f), str)
        shown = "" if f.default is None else f" (default: {f.default})"
        group.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata["choices"],
                           help=help_text + shown)


def _base_type(f):
    text = str(f.type)
    for name in ("int", "float", "str", "bool"):
        if name in text:
            return name
    return "str"


def given_flags(namespace, cls):
    """{option: value} of the flags the user gave that belong to `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}


def from_flags(namespace, cls):
    """An options object of `cls` from parsed flags: the given ones, the rest at their defaults; each
    value checked (Options.validate)."""
    return cls(**given_flags(namespace, cls)).validate()


def fields_of(cls):
    return [f.name for f in dataclasses.fields(cls)]
