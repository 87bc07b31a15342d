"""The retraining loss, LM and distillation mixed, computed over the vocabulary in row chunks.

Why not ``F.cross_entropy``/``F.kl_div`` on the whole ``(tokens, vocab)`` logits: each of their
intermediates (log-softmax of student and teacher, teacher probabilities, the elementwise product) is
another tokens × vocab buffer, 200 MB for 4 × 256 tokens and a 49k vocabulary. On a CPU, allocating
and first-touching those every step cost more than the arithmetic (1.4–2.0 s against 0.13–0.2 s for the
same sums in chunks, measured on SmolLM2). Here only the logits' gradient is full-size; it is computed
in the forward pass, chunk by chunk, since it is closed-form: ``softmax(s) − target``.

With ``d = distill``, N positions and M labelled positions (all but the last of each window):

    loss = d/N · Σ_rows KL(p_teacher ‖ p_student) + (1 − d)/M · Σ_labelled −log p_student(next token)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROWS_PER_CHUNK = 128  # 128 × 49k floats = 25 MB: small enough to be reused from the heap, step after step


def _topk_kl_(grad: Tensor, log_p: Tensor, idx: Tensor, p_top: Tensor, rest: Tensor) -> Tensor:
    """KL of the teacher's (k + 1)-bucket distribution to the student's folded the same way, summed over
    the rows; ``grad`` (the student's softmax on entry) becomes its gradient w.r.t. the logits.

    With q the student's probabilities, the bucket's student mass ``q_rest`` is the sum over the tokens
    outside the teacher's top k (summed directly: ``1 − Σ top`` loses it to cancellation). The gradient is
    ``q − t`` where ``t`` is the teacher's probability on its top k and ``rest · q_j / q_rest`` elsewhere
    (the bucket's mass spread the way the student spreads it).
    """
    p_top = p_top.to(grad.dtype)
    rest = rest.to(grad.dtype)
    q_top = grad.gather(1, idx)  # (rows, k)
    q_rest = grad.scatter(1, idx, 0.0).sum(1).clamp_min(torch.finfo(grad.dtype).tiny)  # (rows,)
    kl = torch.xlogy(p_top, p_top) - p_top * log_p.gather(1, idx)
    kl_rest = torch.xlogy(rest, rest) - rest * q_rest.log()
    grad.mul_((1.0 - rest / q_rest).unsqueeze(1))
    grad.scatter_(1, idx, q_top - p_top)
    return kl.sum(dtype=torch.float64) + kl_rest.sum(dtype=torch.float64)


class _MixedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, teacher: Tensor | None, labels: Tensor, distill: float) -> Tensor:
        n = logits.shape[0]
        labelled = labels >= 0
        m = int(labelled.sum())
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: softmax in fp32
        grad = torch.empty_like(logits, dtype=dtype)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        kl_scale = distill / n
        ce_scale = (1.0 - distill) / max(m, 1)
        for start in range(0, n, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            log_p = F.log_softmax(logits[rows].to(dtype), dim=-1)
            chunk_grad = log_p.exp()  # softmax(s); the gradient is built on it in place
            if distill > 0 and isinstance(teacher, tuple):  # top-k targets + the rest as one bucket
                total += kl_scale * _topk_kl_(chunk_grad, log_p, *(t[rows] for t in teacher))
                chunk_grad.mul_(kl_scale)
            elif distill > 0:
                log_t = F.log_softmax(teacher[rows].to(dtype), dim=-1)
                p_t = log_t.exp()
                terms = p_t * (log_t - log_p)  # 0 · (−inf) where a teacher logit is −inf (masked token)
                total += kl_scale * terms.masked_fill_(p_t == 0, 0.0).sum(dtype=torch.float64)
                chunk_grad.sub_(p_t).mul_(kl_scale)
            else:
                chunk_grad.zero_()
            if distill < 1 and m:
                keep = labelled[rows]
                idx = keep.nonzero().squeeze(1)
                targets = labels[rows][idx]
                picked = log_p[idx, targets]
                total -= ce_scale * picked.sum(dtype=torch.float64)
                soft = log_p[idx].exp_().mul_(ce_scale)  # + (1 − d)/M · softmax(s) on labelled rows
                soft[torch.arange(len(idx), device=idx.device), targets] -= ce_scale  # − onehot
                chunk_grad.index_add_(0, idx, soft)
            grad[rows] = chunk_grad
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return total.to(dtype)  # float32 for bf16 logits too: a loss rounded to bf16 hides progress

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)).to(ctx.logits_dtype), None, None, None


def retraining_loss(
    logits: Tensor,
    input_ids: Tensor,
    teacher_logits: Tensor | tuple[Tensor, Tensor, Tensor] | None = None,
    distill: float = 0.0,
) -> Tensor:
    """Mean next-token loss of ``(B, L, V)`` logits on their own windows, mixed with KL to the teacher.

    ``distill = 0``: the causal-LM loss (``labels = input_ids``, shifted), teacher unused. ``distill = 1``:
    KL(teacher ‖ model) averaged over all B·L positions. In between: the weighted sum. The teacher is
    its ``(B, L, V)`` logits, or its top-k targets ``(indices (B, L, k), probs (B, L, k), rest (B, L))``
    (``teacher.TopKTargets.rows``), whose KL folds every other token into one bucket.
    """
    if distill > 0 and teacher_logits is None:
        raise ValueError("distill > 0 needs teacher_logits")
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    teacher = None
    if distill > 0 and isinstance(teacher_logits, tuple):
        idx, probs, rest = teacher_logits
        k = idx.shape[-1]
        teacher = (idx.reshape(-1, k), probs.reshape(-1, k), rest.reshape(-1))
        teacher = tuple(t.to(flat.device) for t in teacher)
    elif distill > 0:
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    return _MixedLoss.apply(flat, teacher, labels.reshape(-1).to(flat.device), float(distill))
