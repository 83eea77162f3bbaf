"""The pipeline end to end on a built-in tiny default, on a CPU, with no network.

    python demo.py [--out_dir demo_out] [--model_id configs/tiny-deepseek-v2] [--steps 20]

1. data:    a small corpus made from the Python standard library's docstrings, a byte-level BPE
            tokenizer trained on it, and bookcorpus.py turning it into rows of --seq_len tokens;
2. model:   the tiny DeepSeek-V2 built from its config.json with random weights, then its training
            form (router custom op, merged experts, grouped GEMM), checked against the reference
            on one forward and backward;
3. compile: a plan for 4 devices with the cpu profile (train.py --run_mode compile);
4. train:   that plan replicated on 8 CPU processes (torchrun ... train.py) for --steps steps,
            printing the loss curve, and saving a sharded checkpoint at the end;
5. merge:   merge_ckpt.py turns that checkpoint into a Hugging Face directory, which transformers
            loads (AutoModelForCausalLM, trust_remote_code) and scores on the training rows.

Everything lands in --out_dir (default demo_out/), which is rebuilt on every run.
"""

import argparse
import copy
import os
import shutil
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="demo_out", help="working directory for data and outputs (rebuilt)")
    p.add_argument("--model_id", default="configs/tiny-deepseek-v2", help="model directory (config.json)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per row of the prepared data")
    p.add_argument("--batch_size", type=int, default=4, help="rows in the demo batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--steps", type=int, default=20, help="training steps of step 4 (0 skips steps 3 and 4)")
    p.add_argument("--processes", type=int, default=8, help="CPU processes of step 4 (a multiple of 4)")
    return p.parse_args(argv)


def step(title):
    print(f"\n== {title}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    import bookcorpus
    import datasets
    import demo_data
    from modeling import build_model, load_config
    from modeling.training_form import apply_training_form

    started = time.perf_counter()
    shutil.rmtree(args.out_dir, ignore_errors=True)
    os.makedirs(args.out_dir)
    corpus = os.path.join(args.out_dir, "corpus.jsonl")
    tokenizer_dir = os.path.join(args.out_dir, "tokenizer")
    data_dir = os.path.join(args.out_dir, f"data_{args.seq_len}")

    step("1. data: corpus, tokenizer, bookcorpus.py")
    documents = demo_data.write_stdlib_corpus(corpus)
    config = load_config(args.model_id)
    demo_data.train_demo_tokenizer(corpus, tokenizer_dir, vocab_size=config.vocab_size)
    print(f"corpus: {documents} documents in {corpus}; tokenizer ({config.vocab_size} tokens) in {tokenizer_dir}")
    rc = bookcorpus.main(["--data_path_or_name", corpus, "--tokenizer_path_or_name", tokenizer_dir,
                          "--save_path", data_dir, "--sequence_length", str(args.seq_len)])
    if rc != 0:
        return rc

    step(f"2. model: {args.model_id}")
    reference = build_model(config, seed=args.seed)
    n_params = sum(p.numel() for p in reference.parameters())
    print(f"{type(reference).__name__}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.n_routed_experts} experts top-{config.num_experts_per_tok}, {n_params:,} parameters")
    training = apply_training_form(copy.deepcopy(reference))
    print("training form: router op deepseek::moe_route, experts merged for grouped GEMM, SDPA attention")

    print("forward and backward on a batch:")
    rows = datasets.load_from_disk(data_dir).with_format("torch")
    batch = rows[: args.batch_size]["input_ids"].long()
    reference.train(), training.train()
    ref_out = reference(input_ids=batch, labels=batch)
    out = training(input_ids=batch, labels=batch)
    out.loss.backward()
    ref_out.loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in training.parameters() if p.grad is not None))
    print(f"batch {tuple(batch.shape)}: loss {out.loss.item():.4f} (cross-entropy {out.lm_loss.item():.4f} "
          f"+ balance {out.aux_loss.item():.5f}), reference loss {ref_out.loss.item():.4f}, "
          f"grad norm {grad_norm.item():.4f}")
    if not torch.allclose(out.loss, ref_out.loss, rtol=1e-5):
        print("error: the training form's loss differs from the reference's", file=sys.stderr)
        return 1
    if args.steps > 0:
        rc = compile_and_train(args, data_dir)
        if rc != 0:
            return rc
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; outputs in {args.out_dir}/")
    return 0


def compile_and_train(args, data_dir):
    import json
    import subprocess
    plan_path = os.path.join(args.out_dir, "plan.json")
    step("3. compile a 4-device plan (cpu profile)")
    compile_cmd = [sys.executable, "train.py", "--run_mode", "compile", "--model_id", args.model_id,
                   "--plan_ngpus", "4", "--runtime_ngpus", str(args.processes), "--seq_len", str(args.seq_len),
                   "--micro_batch_size", "2", "--global_batch_size", "32", "--device_profile", "cpu",
                   "--mem_limit_gib", "8", "--plan_out", plan_path]
    print(" ".join(compile_cmd[1:]))
    if subprocess.run(compile_cmd).returncode != 0:
        return 1
    step(f"4. train: the plan replicated on {args.processes} CPU processes, {args.steps} steps")
    save_dir = os.path.join(args.out_dir, "run")
    train_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                 "train.py", "--model_id", args.model_id, "--dataset_path", data_dir, "--plan", plan_path,
                 "--runtime_ngpus", str(args.processes), "--device", "cpu", "--max_steps", str(args.steps),
                 "--lr", "3e-3", "--warmup_steps", "2", "--seed", str(args.seed), "--save_dir", save_dir,
                 "--tokenizer_path", os.path.join(args.out_dir, "tokenizer")]
    print("torchrun " + " ".join(train_cmd[3:]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if subprocess.run(train_cmd, env=env).returncode != 0:
        return 1
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    curve = " ".join(f"{r['loss']:.3f}" for r in records)
    print(f"loss by step: {curve}")
    first, last = records[0]["loss"], records[-1]["loss"]
    print(f"loss {first:.4f} -> {last:.4f} ({'falling' if last < first else 'NOT falling'})")
    if last >= first:
        return 1
    return merge_and_load(args, save_dir, data_dir)


def merge_and_load(args, save_dir, data_dir):
    import subprocess

    import datasets
    from transformers import AutoModelForCausalLM
    step("5. merge the final checkpoint into a Hugging Face directory and load it with transformers")
    hf_dir = os.path.join(args.out_dir, "hf")
    merge_cmd = [sys.executable, "merge_ckpt.py", "--ckpt_dir", save_dir, "--output_dir", hf_dir]
    print(" ".join(merge_cmd[1:]))
    if subprocess.run(merge_cmd).returncode != 0:
        return 1
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    rows = datasets.load_from_disk(data_dir).with_format("torch")
    batch = rows[: args.batch_size]["input_ids"].long()
    with torch.no_grad():
        loss = model.eval()(input_ids=batch, labels=batch).loss
    print(f"{hf_dir}: {sorted(os.listdir(hf_dir))}")
    print(f"AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) -> {type(model).__name__}; "
          f"its loss on {tuple(batch.shape)} training rows: {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
