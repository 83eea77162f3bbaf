"""Every loss path of the runtime, one module: the plain next-token loss over full logits, the
pipeline's last-stage loss, and the same loss from the final hidden states a chunk at a time.

All of them compute the summed next-token cross-entropy of a micro-batch, which the trainer divides
by the target count of the whole global batch (see runtime/step.py); the plain one is the model's own
`next_token_cross_entropy`, so the model's Hugging Face loss and the trainer's are one function.

`chunked_lm_loss_sum(hidden, lm_head, labels, chunk_tokens)`: with DeepSeek's 102400-token
vocabulary, a micro-batch of 4 x 2048 positions has 3.4 GB of float32 logits, and autograd keeps the
float32 log-softmax and builds float32 and bf16 gradients of the same size, several times the memory
of a decoder layer's activations. The chunked path returns the same sum without ever holding more
than one chunk's logits: for each chunk of positions it computes the logits (in the compute dtype,
as lm_head does), takes the cross-entropy with float32 statistics and, in the same pass, the gradient
of the summed loss with respect to the chunk's logits (softmax - one-hot), which it turns at once
into the chunk's hidden-state gradient and adds to the lm_head weight gradient (float32 accumulation
over chunks, by the GEMM itself on CUDA); then the chunk's logits are freed. The backward only scales the two stored gradients
by the incoming gradient. On CUDA the softmax, loss and gradient are one compiled reduction +
elementwise pass over the bf16 logits. The work is the plain path's (one GEMM forward, two backward
per chunk); only the grouping and the order of a few float operations differ, so the loss and
gradients equal the plain path's up to float rounding.
"""

import functools

import torch
import torch.nn.functional as F

from modeling.kernels import STATIC_SHAPES, compiled_on_cuda
from modeling import IGNORE_INDEX, next_token_cross_entropy


def lm_loss_sum(logits_BSV, labels_BS):
    """Summed next-token cross-entropy over full logits (the model's own loss function)."""
    return next_token_cross_entropy(logits_BSV, labels_BS, reduction="sum")


class PipelineLoss:
    """The last pipeline stage's loss: loss_fn(logits [B, S, V], labels [B, S]) = lm_loss_sum / TOKENS,
    TOKENS the target count of the whole global batch, so the schedule backpropagates J's
    cross-entropy part unscaled. The schedule holds this one object for the whole run; TOKENS
    changes with each global batch when labels mask positions (instruction data), so the pipeline
    sets `tokens` before each step (1 for an eval pass: plain sums).

    Under the chunked loss the last stage computes the micro-batch's summed cross-entropy itself
    (StageModule.head_loss = stage_chunked_loss(N)) and returns that scalar in place of the logits:
    a 0-dim output is that sum, divided by TOKENS alone (the schedule still hands the labels as
    its target)."""

    def __init__(self, tokens_in_global_batch):
        self.tokens = tokens_in_global_batch

    @property
    def tokens(self):
        return self._tokens

    @tokens.setter
    def tokens(self, value):
        if value <= 0:
            raise ValueError(f"tokens_in_global_batch must be positive, got {value}")
        self._tokens = value

    def __call__(self, output, labels_BS):
        if output.dim() == 0:  # the stage's own cross-entropy sum (logits are [B, S, V])
            return output / self._tokens
        return lm_loss_sum(output, labels_BS) / self._tokens


def pipeline_loss_fn(tokens_in_global_batch):
    """A PipelineLoss dividing by `tokens_in_global_batch` (TOKENS of the first step)."""
    return PipelineLoss(tokens_in_global_batch)


def stage_chunked_loss(chunk_tokens):
    """The last pipeline stage's head_loss under --ce_chunk_tokens: (final normed hidden, lm_head,
    labels) -> chunked_lm_loss_sum, the micro-batch's summed cross-entropy from its hidden states."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return functools.partial(chunked_lm_loss_sum, chunk_tokens=int(chunk_tokens))


@compiled_on_cuda
def _cross_entropy_and_grad(logits_nV, targets_n):
    """(summed cross-entropy of the rows whose target is not IGNORE_INDEX, float32;
    d(that sum)/d logits = softmax - one-hot, zero on ignored rows, in the logits' dtype).

    The statistics are taken in float32 whatever the logits' dtype. On CUDA this is compiled into a
    reduction and one elementwise pass over the (bf16) logits, so no float32 copy of the chunk's
    logits is written; elsewhere it runs as written."""
    logits = logits_nV.float()
    keep_n = targets_n != IGNORE_INDEX
    safe_n1 = torch.where(keep_n, targets_n, 0).unsqueeze(1)
    lse_n = torch.logsumexp(logits, dim=-1)
    loss = torch.where(keep_n, lse_n - logits.gather(1, safe_n1).squeeze(1), 0.0).sum()
    # an ignored row's softmax is exp(x - inf) = 0, and it gets no one-hot
    probs = torch.exp(logits - torch.where(keep_n, lse_n, float("inf")).unsqueeze(1))
    is_target = torch.arange(logits.shape[1], device=logits.device) == torch.where(keep_n, targets_n, -1).unsqueeze(1)
    return loss, torch.where(is_target, probs - 1.0, probs).to(logits_nV.dtype)


def _accumulate_product(total_VD, a_VN, b_ND):
    """total + a @ b in float32 (a new float32 product when total is None). A bf16 / fp16 product on
    CUDA is accumulated by the GEMM itself (cuBLAS with a float32 output and beta = 1: no bf16 product
    written and re-read by a separate add, 12 ms per step of the 4-layer Coder-V2-Lite slice at 32 x 2048
    tokens on an H200); elsewhere the product is formed and added."""
    low_precision = a_VN.dtype in (torch.bfloat16, torch.float16)
    if low_precision and a_VN.is_cuda:
        if total_VD is None:
            return torch.mm(a_VN, b_ND, out_dtype=torch.float32)
        return torch.addmm(total_VD, a_VN, b_ND, out_dtype=torch.float32, out=total_VD)
    if total_VD is None:
        return (a_VN @ b_ND).float()
    if not low_precision:
        return total_VD.addmm_(a_VN, b_ND)
    total_VD += a_VN @ b_ND
    return total_VD


class _ChunkedLinearCrossEntropySum(torch.autograd.Function):
    """sum_n CE(hidden_ND[n] @ weight_VD.T, targets_N[n]) over rows whose target is not IGNORE_INDEX."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, chunk_rows):
        N = hidden_ND.shape[0]
        # a frozen lm_head (LoRA) gets no weight gradient: its GEMM and float32 accumulator are skipped
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        grad_hidden_ND = torch.empty_like(hidden_ND) if want_hidden else None
        grad_weight_VD = None
        starts = range(0, N, chunk_rows)
        for start in starts:
            h_nD = hidden_ND[start:start + chunk_rows]
            loss, grad_nV = _cross_entropy_and_grad(h_nD @ weight_VD.t(), targets_N[start:start + chunk_rows])
            total += loss
            # grad_nV is in the compute dtype, as the plain path's lm_head backward GEMMs see it
            if want_hidden:  # written in place into its rows (a contiguous slice): no temporary and copy
                torch.mm(grad_nV, weight_VD, out=grad_hidden_ND[start:start + chunk_rows])
            if want_weight:
                if len(starts) == 1:
                    grad_weight_VD = grad_nV.t() @ h_nD
                else:  # float32 accumulation over the chunks
                    grad_weight_VD = _accumulate_product(grad_weight_VD, grad_nV.t(), h_nD)
            del grad_nV
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD)
        ctx.weight_dtype = weight_VD.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        grad_hidden = None if grad_hidden_ND is None else (grad_hidden_ND * grad_total).to(grad_hidden_ND.dtype)
        grad_weight = None if grad_weight_VD is None else (grad_weight_VD * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_lm_loss_sum(hidden_BSD, lm_head, labels_BS, chunk_tokens, targets_only=False):
    """Summed next-token cross-entropy of a micro-batch (position s predicts labels[s + 1], a label
    IGNORE_INDEX counting for nothing; the last position predicts nothing), float32, computed
    `chunk_tokens` positions at a time from the final (normed) hidden states and lm_head (an
    nn.Linear without bias, or its weight). labels_BS: the input ids for pretraining rows.

    targets_only: the head runs on the positions that have a target and no others (for instruction
    rows, whose prompts are no targets: the head's GEMMs and the softmax passes shrink by the prompts'
    share, 40 % in bench/finetune_step.py). The sum is the same (an ignored position adds nothing and
    gets a zero gradient either way); counting those positions waits for the device once,
    so it is for rows with labels, where it pays."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    weight_VD = lm_head.weight if hasattr(lm_head, "weight") else lm_head
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("chunked_lm_loss_sum: lm_head has a bias, which this loss does not add")
    D = hidden_BSD.shape[-1]
    if targets_only:
        # position s's target is labels[s + 1]; the last position of a row has none
        targets_N = F.pad(labels_BS[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        ignored_N = (targets_N == IGNORE_INDEX).to(torch.int8)
        kept = targets_N.numel() - int(ignored_N.sum())  # the one wait for the device
        # the count rounded up to a multiple of a quarter chunk, with positions whose target is ignored
        # (they add nothing): the last chunk then has one of STATIC_SHAPES sizes, each compiled once,
        # rather than a new size (and a compilation, 0.1 to 0.2 s) at many a step
        rows = kept + (-kept % -(-int(chunk_tokens) // STATIC_SHAPES))
        if rows > targets_N.numel():
            rows = kept
        # the positions with a target in order, then ignored ones (a stable sort of the 0 / 1 flags)
        rows_n = torch.argsort(ignored_N, stable=True)[:rows]
        hidden_ND = hidden_BSD.reshape(-1, D).index_select(0, rows_n)
        targets_N = targets_N.index_select(0, rows_n)
    else:
        hidden_ND = hidden_BSD[:, :-1].reshape(-1, D)
        targets_N = labels_BS[:, 1:].reshape(-1)
    return _ChunkedLinearCrossEntropySum.apply(hidden_ND, weight_VD, targets_N, int(chunk_tokens))
