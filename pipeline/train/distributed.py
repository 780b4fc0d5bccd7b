"""torch.distributed around the training loop: launch, process group, wrapping, state dicts.

Parallelism is applied from outside the model (torchtitan style): the loop
builds a plain Transformer, `wrap_model` makes it DDP or FSDP2, and the
state-dict helpers always produce full, unsharded, FQN-keyed state, so a
checkpoint written by N processes with either strategy resumes with M
processes (or one) and exports the same way.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# A collective that waits longer than this means a peer died or hung: fail instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("MM_COLLECTIVE_TIMEOUT_S", "60")))


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def under_launcher() -> bool:
    """True when torchrun (or srun with torch's env vars) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device_type: str) -> World:
    if not under_launcher():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if world.distributed:
        # CUDA tensors go through NCCL; the loop's small CPU tensors (loss, stop flag) through gloo.
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return world


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def check_same(value: int, world: World, what: str) -> None:
    """Raise UserError on every rank unless all ranks hold the same `value`."""
    if not world.distributed:
        return
    from pipeline.errors import UserError

    bounds = torch.tensor([value, -value], dtype=torch.float64)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if bounds[0].item() != -bounds[1].item():
        raise UserError(f"ranks disagree on {what}: rank {world.rank} has {value}, "
                        f"others from {-bounds[1].item():g} to {bounds[0].item():g}")


def launcher_command(
    module: str, module_args: list[str], procs_per_node: int, nodes: int = 1, node_rank: int = 0,
    master_addr: str = "127.0.0.1", master_port: int = 29500, rdzv_endpoint: str | None = None,
) -> list[str]:
    """argv that runs `python -m module *module_args` under torch.distributed.run; never a shell string.

    The caller names the module (the CLI lives in stages/, which pipeline/ never imports)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs_per_node}", f"--nnodes={nodes}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    # Fail fast: a dead worker tears the whole group down instead of restarting it.
    cmd += ["--max-restarts=0", "--monitor-interval=1", "-m", module, *module_args]
    return cmd


# ---------------------------------------------------------------------------
# Wrapping and state
# ---------------------------------------------------------------------------


def wrap_model(model: torch.nn.Module, world: World, strategy: str, device: torch.device,
               find_unused: bool = False) -> torch.nn.Module:
    """DDP or FSDP2 around the model when several processes run; the model itself otherwise."""
    if not world.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # MoE: an expert that no token chose has no gradient this step; DDP must be told to expect that.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
    ddp.grad_sync_counter = GradSyncCounter()
    ddp.register_comm_hook(None, ddp.grad_sync_counter.hook)
    return ddp


class GradSyncCounter:
    """DDP communication hook: torch's default all-reduce, counted.

    The loop compares `reductions` before and after each backward, so train_log's
    `grad_syncs` column says how many micro-steps of an optimizer step all-reduced
    gradients: 1 when no_sync works (only the last micro-step), accumulation_steps
    if it did not. DDP may split the gradients into several buckets; each bucket
    is one call here, so the loop counts backwards that communicated, not buckets.
    """

    def __init__(self):
        self.reductions = 0

    def hook(self, _state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.reductions += 1
        return allreduce_hook(None, bucket)  # None: the default process group, mean over ranks


def grad_sync_counter(model: torch.nn.Module) -> GradSyncCounter | None:
    """The DDP wrapper's counter; None for one process (nothing to sync) or FSDP (not counted)."""
    return getattr(model, "grad_sync_counter", None)


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """All-reduce (or reduce-scatter) gradients only on the last micro-step of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP: what no_sync() toggles
        model.require_backward_grad_sync = enabled


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, optimizer, world: World) -> tuple[dict, dict]:
    """Unsharded model and optimizer state keyed by parameter name (collective under FSDP)."""
    options = _FULL if world.distributed else StateDictOptions(full_state_dict=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, world: World) -> None:
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
