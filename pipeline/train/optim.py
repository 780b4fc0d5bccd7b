"""The optimizer and its learning-rate schedule (what `train.optimizer`, `train.lr`, `train.muon_*` mean).

`adamw`: AdamW on every parameter, decaying matrices only.
`muon`:  torch.optim.Muon (momentum, then Newton–Schulz orthogonalisation of the update) on the
         2-D weight matrices inside the transformer blocks, AdamW on the rest: the embedding
         (which is also the tied output head), norms' gains and any bias. This is the split of
         Keller Jordan's Muon and of modded-nanogpt / nanochat: orthogonalised updates suit
         hidden matrices, not lookup tables or the output layer.

One warmup + decay curve (`lr_at`, train.schedule) drives both: each step, every AdamW group gets the
curve's value and every Muon group the same curve scaled to `train.muon_lr`.
"""

from __future__ import annotations

import math

import torch

from pipeline.errors import UserError
from pipeline.hardware import resolve_dtype
from pipeline.params import TrainParams

# Parameters kept on AdamW under `muon` although they are 2-D: the token embedding is a lookup
# table (and, tied, the output head); names as in pipeline/model/transformer.py.
ADAMW_MATRICES = ("embed_tokens.weight", "lm_head.weight")


def make_optimizer(model: torch.nn.Module, tp: TrainParams, device: torch.device):
    """AdamW, or Muon + AdamW (`MuonWithAdamW`) for train.optimizer=muon."""
    if tp.optimizer == "muon":
        return make_muon(model, tp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    return _adamw([p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2], tp)


def _adamw(matrices: list, others: list, tp: TrainParams) -> torch.optim.AdamW:
    """Decay matrices only: norms' gains (and any bias) are not pulled towards 0."""
    groups = [{"params": matrices, "weight_decay": tp.weight_decay}, {"params": others, "weight_decay": 0.0}]
    # Fused: one kernel for the whole update (CUDA, and CPU since torch 2.4) instead of ~10 per tensor.
    return torch.optim.AdamW(groups, lr=tp.lr, betas=(tp.beta1, tp.beta2), fused=True)


def muon_matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters Muon updates: every trainable 2-D weight except the embedding/head."""
    return [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and not name.endswith(ADAMW_MATRICES)]


def make_muon(model: torch.nn.Module, tp: TrainParams, device: torch.device) -> MuonWithAdamW:
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"train.optimizer=muon needs torch >= 2.9 (torch.optim.Muon); "
                        f"this is torch {torch.__version__}")
    hidden = {id(p) for _, p in muon_matrices(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
    muon = Muon(
        [{"params": [p for _, p in muon_matrices(model)], "muon": True}],
        lr=tp.muon_lr, momentum=tp.muon_momentum, weight_decay=tp.muon_weight_decay, nesterov=True,
        ns_dtype=resolve_dtype(tp.dtype, device),
    )
    adamw = _adamw([p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2], tp)
    return MuonWithAdamW(muon, adamw)


class Muon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):
    """torch.optim.Muon with its Newton–Schulz iteration in the run's precision (train.dtype).

    torch runs the iteration in bf16 whatever the run's precision. In an fp32 run that
    is the only bf16 in the step, and it turns float summation-order differences into
    different roundings: 2 DDP processes vs 1 with double accumulation drifted 5e-5 apart
    in loss within 12 steps (AdamW: 5e-7). So fp32 runs orthogonalise in fp32 (the same
    update, the same state: one momentum buffer per matrix); bf16/fp16 runs take
    torch's step unchanged.
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **options):
        super().__init__(params, **options)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype != torch.float32:
            return super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])  # as torch.optim.Muon, line for line
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                rows, cols = p.shape
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))  # adjust_lr_fn "original"
        return None


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton–Schulz iteration, in g's own dtype."""
    a, b, c = coefficients
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class MuonWithAdamW:
    """Muon and AdamW over disjoint parameters, stepped as one optimizer.

    It has what the loop and torch.amp.GradScaler use of an optimizer (param_groups, step,
    zero_grad), and iterates over its two optimizers: torch.distributed.checkpoint's
    get/set_optimizer_state_dict take an iterable of optimizers and merge their state
    keyed by parameter name, so checkpoints hold both and resume restores both exactly.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    def __iter__(self):
        return iter((self.muon, self.adamw))

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------


def lr_at(step: int, tp: TrainParams, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps` (train.schedule).

    Every schedule: linear warmup over warmup_steps reaches lr at step warmup_steps - 1
    (step 0 without warmup). Then
      cosine    cosine decay from there, the only step at lr, to min_lr exactly at the last step;
      wsd       lr until the decay's D steps (decay_steps, else decay_fraction × total_steps, never
                into warmup), then decay_shape from lr towards min_lr, reached exactly at the last step;
      constant  lr to the end.
    Steps past the end stay where the last step was."""
    if step < tp.warmup_steps:
        return tp.lr * (step + 1) / tp.warmup_steps
    peak = max(tp.warmup_steps - 1, 0)
    if tp.schedule == "constant":
        return tp.lr
    if tp.schedule == "cosine":
        progress = (step - peak) / max(total_steps - 1 - peak, 1)
        return tp.min_lr + 0.5 * (tp.lr - tp.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    stable_end = total_steps - 1 - decay_length(tp, total_steps)  # the last step at lr
    if step <= stable_end:
        return tp.lr
    progress = min((step - stable_end) / max(total_steps - 1 - stable_end, 1), 1.0)  # (0, 1], 1 at the last step
    if tp.decay_shape == "linear":
        return tp.min_lr + (tp.lr - tp.min_lr) * (1 - progress)
    if tp.decay_shape == "cosine":
        return tp.min_lr + 0.5 * (tp.lr - tp.min_lr) * (1 + math.cos(math.pi * progress))
    return tp.min_lr + (tp.lr - tp.min_lr) * (1 - math.sqrt(progress))  # 1-sqrt


def decay_length(tp: TrainParams, total_steps: int) -> int:
    """wsd: how many last steps decay. decay_steps if set, else decay_fraction of the run, rounded; at
    most the steps after the warmup's peak, so the decay never starts before lr was reached."""
    wanted = tp.decay_steps or round(tp.decay_fraction * total_steps)
    return min(wanted, total_steps - max(tp.warmup_steps, 1))


def set_lr(optimizer, lr: float, tp: TrainParams) -> None:
    """AdamW's groups take the schedule's lr; Muon's the same curve scaled to train.muon_lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * tp.muon_lr / tp.lr if group.get("muon") else lr
