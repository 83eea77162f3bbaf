"""Fine-tuning end to end on a built-in tiny default, on a CPU, with no network.

    python demo_finetune.py [--out_dir demo_ft_out] [--model_id configs/tiny-deepseek-v2] [--steps 30]

1. data:    a small instruction set made from the Python standard library ("What does the function
            `base64.b64encode` do?" -> its docstring's first sentence), a BPE tokenizer trained on
            the docstrings, and `bookcorpus.py --format sft` rendering it in the DeepSeek chat format
            (labels on the answers only) packed into rows of --seq_len tokens; a held-out part of the
            set is prepared the same way for validation;
2. base:    the tiny DeepSeek-V2 with seeded random weights, saved as a Hugging Face directory (the
            base model a user would download);
3. compile: a 2-device plan for LoRA (every projection, routed experts included, rank --lora_rank)
            on packed rows (`--document_masking on`), cpu profile;
4. train:   that plan on 2 CPU processes (torchrun) for --steps steps, cosine schedule, validation
            loss every 10 steps, the base frozen and only the adapters trained;
5. export:  merge_ckpt.py writes a PEFT adapter directory, which peft loads on the base model
            (`PeftModel.from_pretrained`), and, with --merge_lora, the merged weights as a plain
            Hugging Face checkpoint; both are scored on the validation rows beside the run's own
            validation loss.

Everything lands in --out_dir (default demo_ft_out/), which is rebuilt on every run.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from demo import step
from modeling import IGNORE_INDEX


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="demo_ft_out", help="working directory for data and outputs (rebuilt)")
    p.add_argument("--model_id", default="configs/tiny-deepseek-v2", help="model directory (config.json)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per packed row")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank of every adapter")
    p.add_argument("--processes", type=int, default=2, help="CPU processes of the run (the plan's devices)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights and of the run")
    return p.parse_args(argv)


def run(cmd, env=None):
    shown = cmd[3:] if cmd[1:3] == ["-m", "torch.distributed.run"] else cmd[1:]
    print(("torchrun " if cmd[1:3] == ["-m", "torch.distributed.run"] else "") + " ".join(shown), flush=True)
    return subprocess.run(cmd, env=env).returncode


def response_loss(model, data_dir):
    """Mean next-token cross-entropy over the response tokens of every row (document-masked)."""
    import datasets
    rows = datasets.load_from_disk(data_dir).with_format("torch")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = rows[start:start + 16]
            logits = model(input_ids=batch["input_ids"].long(), position_ids=batch["position_ids"].long()).logits
            targets = batch["labels"].long()[:, 1:]
            total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                       ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def save_base_model(model, hf_dir, tokenizer_dir):
    """A Hugging Face directory as a hub model has it: weights, config.json with auto_map, the modeling
    code (trust_remote_code imports it) and the tokenizer."""
    import merge_ckpt
    model.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        fields = json.load(f)
    fields["auto_map"] = merge_ckpt.auto_map(model.config.model_type)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(fields, f, indent=2, sort_keys=True)
    for name in merge_ckpt.MODELING_FILES:
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling", name),
                        os.path.join(hf_dir, name))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(hf_dir, name))


def main(argv=None):
    args = parse_args(argv)
    import bookcorpus
    import demo_data
    from modeling import build_model, load_config

    started = time.perf_counter()
    shutil.rmtree(args.out_dir, ignore_errors=True)
    os.makedirs(args.out_dir)
    out = lambda *parts: os.path.join(args.out_dir, *parts)  # noqa: E731

    step("1. data: instruction set, tokenizer, bookcorpus.py --format sft")
    examples = demo_data.instruction_examples()
    held_out = max(16, len(examples) // 10)
    for name, part in (("train", examples[:-held_out]), ("eval", examples[-held_out:])):
        with open(out(f"{name}.jsonl"), "w") as f:
            for example in part:
                f.write(json.dumps(example) + "\n")
    demo_data.write_stdlib_corpus(out("corpus.jsonl"))
    config = load_config(args.model_id)
    demo_data.train_demo_tokenizer(out("corpus.jsonl"), out("tokenizer"), vocab_size=config.vocab_size)
    print(f"{len(examples) - held_out} training and {held_out} validation examples, e.g. {examples[0]}")
    for name in ("train", "eval"):
        rc = bookcorpus.main(["--format", "sft", "--data_path_or_name", out(f"{name}.jsonl"),
                              "--tokenizer_path_or_name", out("tokenizer"), "--save_path", out(f"sft_{name}"),
                              "--sequence_length", str(args.seq_len)])
        if rc != 0:
            return rc

    step(f"2. base model: {args.model_id}, seeded random weights, saved in Hugging Face format")
    base = build_model(config, seed=args.seed)
    save_base_model(base, out("base"), out("tokenizer"))
    print(f"{type(base).__name__}: {sum(p.numel() for p in base.parameters()):,} parameters in {out('base')}")
    base_loss = response_loss(base.eval(), out("sft_eval"))
    print(f"validation loss of the base model (response tokens): {base_loss:.4f}")

    step(f"3. compile a {args.processes}-device LoRA plan for packed rows (cpu profile)")
    plan = out("plan.json")
    lora = ["--lora_rank", str(args.lora_rank), "--lora_alpha", str(2 * args.lora_rank)]
    if run([sys.executable, "train.py", "--run_mode", "compile", "--model_id", out("base"),
            "--plan_ngpus", str(args.processes), "--seq_len", str(args.seq_len), "--micro_batch_size", "2",
            "--global_batch_size", "8", "--device_profile", "cpu", "--mem_limit_gib", "8",
            "--document_masking", "on", "--plan_out", plan, *lora]) != 0:
        return 1

    step(f"4. train the adapters on {args.processes} CPU processes, {args.steps} steps")
    save_dir = out("run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes), "train.py",
            "--model_id", out("base"), "--dataset_path", out("sft_train"), "--plan", plan, "--device", "cpu",
            "--max_steps", str(args.steps), "--lr", "3e-3", "--warmup_steps", "3", "--lr_scheduler", "cosine",
            "--min_lr", "3e-4", "--eval_dataset_path", out("sft_eval"), "--eval_every", "10",
            "--seed", str(args.seed), "--save_dir", save_dir, *lora], env=env) != 0:
        return 1
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_curve = " ".join(f"{r['loss']:.3f}" for r in records if "loss" in r)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    print(f"training loss by step: {train_curve}")
    print(f"validation loss: {base_loss:.4f} (base) -> " + " -> ".join(f"{v:.4f}" for v in evals))
    if not evals or evals[-1] >= base_loss:
        print("error: the validation loss did not fall", file=sys.stderr)
        return 1

    step("5. export: a PEFT adapter, and the merged weights")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    if run([sys.executable, "merge_ckpt.py", "--ckpt_dir", save_dir, "--output_dir", out("adapter")]) != 0:
        return 1
    if run([sys.executable, "merge_ckpt.py", "--ckpt_dir", save_dir, "--output_dir", out("merged"), "--merge_lora",
            "--base_model", out("base")]) != 0:
        return 1
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out("base"), trust_remote_code=True), out("adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out("merged"), trust_remote_code=True).eval()
    adapter_loss, merged_loss = response_loss(peft_model, out("sft_eval")), response_loss(merged, out("sft_eval"))
    print(f"{out('adapter')}: {sorted(os.listdir(out('adapter')))}")
    print(f"validation loss: the run {evals[-1]:.4f}, PeftModel.from_pretrained(base, adapter) {adapter_loss:.4f}, "
          f"the merged checkpoint {merged_loss:.4f}")
    if not (abs(adapter_loss - evals[-1]) < 1e-3 and abs(merged_loss - evals[-1]) < 1e-3):
        print("error: the exported model does not reproduce the run's validation loss", file=sys.stderr)
        return 1
    print(f"\nfine-tuning demo finished in {time.perf_counter() - started:.1f}s; outputs in {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
