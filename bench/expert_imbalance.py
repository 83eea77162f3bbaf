"""Routing imbalance under expert parallelism: how much busier the busiest expert rank is than the mean.

    python bench/expert_imbalance.py [--model_id configs/tiny-deepseek-v2] [--steps 300] [--json OUT.json]

Under expert parallelism rank r of an ep group holds experts [r E/ep, (r+1) E/ep) and computes every
(token, choice) slot routed to them, from the tokens of all ep ranks (runtime/expert_parallel.py);
the all-to-all and the grouped GEMMs of a layer finish when the busiest rank's do. The cost model
prices that with a load-imbalance factor (compiler/cost_model.py, the profile's
`expert_load_imbalance`, `--expert_load_imbalance`): this script measures it as

    ratio = max over ranks of the slots a rank receives / the mean over ranks

for each MoE layer and each group of ep ranks' micro-batches (ep x --tokens_per_rank tokens, taken
from held-out rows), averaged over layers and groups (p95 and the maximum are reported too), for
ep = 2, 4, 8 (those dividing the experts), on the model with its seeded random initial weights and
after --steps steps of training on the demo corpus (the Python standard library's docstrings,
demo_data.py, rows of --seq_len tokens by bookcorpus.py; AdamW in float32 on one CPU process, the
model's own loss with its balance term). CPU only, a few minutes on 2 cores.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEGREES = (2, 4, 8)


def prepare_rows(out_dir, model_id, seq_len):
    """The demo corpus, a tokenizer trained on it, and rows of seq_len tokens (int64 [N, seq_len])."""
    import datasets

    import bookcorpus
    import demo_data
    from modeling import load_config
    data_dir = os.path.join(out_dir, f"data_{seq_len}")
    if not os.path.isdir(data_dir):
        corpus = os.path.join(out_dir, "corpus.jsonl")
        tokenizer_dir = os.path.join(out_dir, "tokenizer")
        demo_data.write_stdlib_corpus(corpus)
        demo_data.train_demo_tokenizer(corpus, tokenizer_dir, vocab_size=load_config(model_id).vocab_size)
        rc = bookcorpus.main(["--data_path_or_name", corpus, "--tokenizer_path_or_name", tokenizer_dir,
                              "--save_path", data_dir, "--sequence_length", str(seq_len)])
        if rc != 0:
            raise SystemExit(rc)
    return datasets.load_from_disk(data_dir).with_format("torch")[:]["input_ids"].long()


def routed_slots(model, batch):
    """{layer index: topk expert ids [T, K]} of one forward of `batch`, read at the routed experts' input."""
    from modeling import spec
    seen, handles = {}, []
    for index, (_, _, experts) in enumerate(spec.family_modules(model, "experts")):
        def hook(module, args, index=index):
            seen[index] = args[1].detach()
        handles.append(experts.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def imbalance(model, rows, num_experts, tokens_per_rank, seq_len):
    """{ep: {"mean", "p95", "max", "groups"}} of max-rank / mean-rank slot counts over the layers and
    groups of ep ranks' micro-batches that the rows make."""
    model.eval()
    rows_per_rank = max(1, tokens_per_rank // seq_len)
    out = {}
    for ep in DEGREES:
        if num_experts % ep:
            continue
        per_group = rows_per_rank * ep
        ratios = []
        for start in range(0, rows.shape[0] - per_group + 1, per_group):
            for topk_idx in routed_slots(model, rows[start:start + per_group]).values():
                counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).double()
                per_rank = counts.view(ep, num_experts // ep).sum(dim=1)
                ratios.append((per_rank.max() / per_rank.mean()).item())
        ratios.sort()
        out[ep] = {"mean": round(statistics.fmean(ratios), 4), "p95": round(ratios[int(0.95 * (len(ratios) - 1))], 4),
                   "max": round(ratios[-1], 4), "groups": len(ratios)}
    model.train()
    return out


def train(model, rows, steps, batch, lr, seed):
    """`steps` AdamW steps on random batches of `rows` (the model's loss: cross-entropy + balance)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        ids = rows[torch.randint(0, rows.shape[0], (batch,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_id", default="configs/tiny-deepseek-v2", help="config.json directory (a MoE model)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per row")
    p.add_argument("--steps", type=int, default=300, help="training steps between the two measurements")
    p.add_argument("--batch", type=int, default=16, help="rows per training step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tokens_per_rank", default="256,1024",
                   help="comma list: tokens of one rank's micro-batch (the tiny plans have 2 x 128)")
    p.add_argument("--eval_rows", type=int, default=384, help="held-out rows the ratios are measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=None, help="corpus, tokenizer and rows (default: a temporary directory)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    from modeling import build_model, load_config
    from modeling.training_form import apply_training_form
    config = load_config(args.model_id)
    if not config.n_routed_experts:
        print(f"error: {args.model_id} has no routed experts", file=sys.stderr)
        return 2
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="expert_imbalance_")
    started = time.perf_counter()
    rows = prepare_rows(out_dir, args.model_id, args.seq_len)
    if rows.shape[0] <= args.eval_rows:
        print(f"error: only {rows.shape[0]} rows; lower --eval_rows", file=sys.stderr)
        return 2
    held_out, train_rows = rows[:args.eval_rows], rows[args.eval_rows:]
    tokens = [int(t) for t in args.tokens_per_rank.split(",")]
    model = apply_training_form(build_model(config, seed=args.seed)).train()
    experts = config.n_routed_experts
    results = {"random": {t: imbalance(model, held_out, experts, t, args.seq_len) for t in tokens}}
    losses = train(model, train_rows, args.steps, args.batch, args.lr, args.seed)
    results["trained"] = {t: imbalance(model, held_out, experts, t, args.seq_len) for t in tokens}
    setup = {"model": os.path.basename(os.path.normpath(args.model_id)), "experts": experts,
             "top_k": config.num_experts_per_tok, "topk_method": getattr(config, "topk_method", None),
             "moe_layers": config.num_hidden_layers - (getattr(config, "first_k_dense_replace", 0) or 0),
             "seq_len": args.seq_len, "steps": args.steps, "batch": args.batch, "lr": args.lr,
             "held_out_rows": args.eval_rows, "training_rows": int(train_rows.shape[0]), "torch": torch.__version__,
             "loss_first": round(losses[0], 4), "loss_last": round(statistics.fmean(losses[-10:]), 4),
             "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(setup, indent=1))
    print("\n| weights | tokens per rank | ep | mean max/mean | p95 | max | groups x layers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for weights, by_tokens in results.items():
        for t, by_ep in by_tokens.items():
            for ep, r in by_ep.items():
                print(f"| {weights} | {t} | {ep} | {r['mean']:.3f} | {r['p95']:.3f} | {r['max']:.3f} | {r['groups']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "results": {w: {str(t): {str(ep): r for ep, r in by_ep.items()}
                                                      for t, by_ep in by_t.items()} for w, by_t in results.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
