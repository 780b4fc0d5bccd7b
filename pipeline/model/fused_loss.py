"""Cross-entropy fused with the output head: the summed token loss of x @ weight.T without
ever holding the (tokens, vocab) logits, a chunk of rows at a time.

Used by the model's forward(targets=...) (training and validation). Pure torch, like the model.
"""

from __future__ import annotations

import torch

# Logits formed at once by the loss: rows × vocab ≈ 2^25 (128 MiB in fp32). Smaller chunks add a
# pass over the weight's (vocab, dim) gradient each; docs/training.md measures it.
LOSS_CHUNK_ELEMENTS = 2**25
IGNORE_INDEX = -100  # a target that scores nothing (F.cross_entropy's default ignore_index)


class LinearCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(x @ weight.T, targets) over rows, never holding more than one chunk's logits.

    x (N, C), weight (V, C), targets (N,) → fp32 scalar; targets equal to
    IGNORE_INDEX score nothing, as in F.cross_entropy. The gradient of a
    cross-entropy is softmax − one-hot, so each chunk's gradients for x and
    weight are formed in the forward pass, right after its logits, and the
    backward only scales them by the incoming gradient: no logits are kept and
    none recomputed. The logits' matmul runs in `dtype` (autocast's, or x's own),
    as F.linear under autocast would; the weight's gradient sums in fp32.

    In fp16 the gradient part (softmax − one-hot and its two matmuls) runs in
    fp32: it is formed here, before the GradScaler's scale reaches it in the
    backward, so in fp16 its small probabilities would underflow to zero and the
    products round to 11 bits. bf16 has fp32's range and keeps `dtype`.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype):
        N, V = x.size(0), weight.size(0)
        rows = max(1, LOSS_CHUNK_ELEMENTS // V)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype  # see the class docstring
        grad_x = torch.empty_like(x, dtype=torch.promote_types(x.dtype, grad_dtype)) if want_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            w_grad = w.to(grad_dtype)  # the weight the logits used, in the gradient's dtype
            for i in range(0, N, rows):
                xs, ts = x[i : i + rows].to(dtype), targets[i : i + rows]
                scored = ts != IGNORE_INDEX
                ts = torch.where(scored, ts, 0)
                logits = (xs @ w.t()).float()  # (rows, V)
                lse = torch.logsumexp(logits, dim=-1)
                loss += torch.where(scored, lse - logits.gather(1, ts[:, None]).squeeze(1), 0.0).sum()
                if want_x or want_w:
                    d = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    d[torch.arange(len(ts), device=d.device), ts] -= 1.0
                    d = d.to(grad_dtype)
                    # Unscored rows are zeroed in the small (rows, C) factors, not in d (rows, V).
                    if want_x:
                        grad_x[i : i + rows] = (d @ w_grad) * scored[:, None]
                    xs = xs.to(grad_dtype) * scored[:, None].to(grad_dtype)
                    if want_w and grad_dtype == torch.float32:
                        grad_w.addmm_(d.t(), xs)
                    elif want_w:
                        grad_w += d.t() @ xs
        ctx.save_for_backward(grad_x, grad_w)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return ((grad_x * grad_loss).to(ctx.x_dtype) if grad_x is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


def linear_cross_entropy(x, weight, targets):
    """Summed token cross-entropy of the logits x @ weight.T (fp32 scalar), in autocast's dtype when it is on."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return LinearCrossEntropy.apply(x, weight, targets, dtype)
