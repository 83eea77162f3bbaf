"""The pipeline end to end on a built-in tiny default, on a CPU, with no network.

    python demo.py [--out_dir demo_out] [--model_id configs/tiny-deepseek-v2]

1. data:  a small corpus made from the Python standard library's docstrings, a byte-level BPE
          tokenizer trained on it, and bookcorpus.py turning it into rows of --seq_len tokens;
2. model: the tiny DeepSeek-V2 built from its config.json with random weights, then its training
          form (router custom op, merged experts, grouped GEMM);
3. step:  one forward and backward on a batch of the prepared data, checked against the reference.

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
    return p.parse_args(argv)


def step(title):
    print(f"\n== {title}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    import bookcorpus
    import datasets
    import demo_data
    from modeling import build_model, load_config
    from modeling.modeling_deepseek_modifier import apply_training_form

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

    step("3. forward and backward on a batch")
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
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; outputs in {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
