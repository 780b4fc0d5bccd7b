"""`mm train`: pretrain on the token store; relaunch under torchrun for several processes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load

CLI_MODULE = "stages.cli"  # what each torchrun worker runs: this same `mm train`, as a module


def train(
    data: Annotated[str, typer.Option(
        help="Token store written by `mm tokenize`: a directory or an s3://, gs://, az:// URL.")] = "data/tokens.zarr",
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer dir the store was tokenized with.")
                         ] = Path("data/tokenizer"),
    model: Annotated[Path, typer.Option(help="Model config written by `mm config`.")] = Path("data/model.json"),
    resume: Annotated[str, typer.Option(
        help="auto (continue from the newest checkpoint in train.out_dir that verifies: its step_*.pth files, "
             "then ckpt.pth), none (start over; an earlier run there is moved to superseded/), or a checkpoint "
             "path.")] = "auto",
    allow_data_change: Annotated[bool, typer.Option(
        help="Resume even though the data changed: the token store, the source weights or train.seed.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    gpus: Annotated[Optional[int], typer.Option(
        help="GPUs per node: relaunch under torchrun with one process each (NCCL); "
             "0 trains on the CPU (as --device cpu).")] = None,
    procs: Annotated[int, typer.Option(
        help="Processes per node on the CPU (gloo), for testing the distributed path anywhere.")] = 0,
    nodes: Annotated[int, typer.Option(help="Number of nodes (multi-node: run the same command on each).")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank, 0 .. nodes-1.")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of node 0.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="Port on node 0.")] = 29500,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(
        help="host:port of a c10d rendezvous (instead of master addr/port).")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="Print the launcher command and the per-rank batch split, then stop.")] = False,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    from pipeline.train.runlock import run_lock

    p = load(params, sets)
    _model_sets(p, sets, model)
    from pipeline.data.store.cache import configure

    configure(p.data.cache_dir, p.data.cache_gb)  # where a store in object storage (s3://...) is cached
    # One writer per out_dir, locked before torch is imported so a second run is refused at once.
    # Under torchrun started by hand rank 0 locks; on several nodes node 0's launcher does.
    worker = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    locks = not dry_run and (os.environ["RANK"] == "0" if worker else node_rank == 0)
    with run_lock(Path(p.train.out_dir), enabled=locks):
        _train(p, data, tokenizer, model, resume, allow_data_change, device, gpus, procs, nodes, node_rank, master_addr,
               master_port, rdzv_endpoint, dry_run, params, sets)


def _model_sets(p, sets, model: Path) -> None:
    """--set model.*: checked as `mm config` checks it, then named as ignored (training reads model.json)."""
    keys = [s.partition("=")[0].strip() for s in sets or [] if s.strip().startswith("model.")]
    if not keys:
        return
    from pipeline.architecture import build_config

    build_config(p.model.preset, p.tokenizer.vocab_size, p.model.overrides)  # a typo is an error, as in mm config
    if "LOCAL_RANK" not in os.environ:  # said once, by the command the user ran (not by each torchrun worker)
        print(f"note: --set {', '.join(keys)}: ignored by mm train, which reads the architecture from {model} "
              "(written by mm config)", file=sys.stderr)


def _train(p, data, tokenizer, model, resume, allow_data_change, device, gpus, procs, nodes, node_rank, master_addr,
           master_port, rdzv_endpoint, dry_run, params, sets) -> None:
    from pipeline.errors import UserError
    from pipeline.train.distributed import launcher_command, under_launcher

    if gpus and procs:
        raise UserError("--gpus and --procs: give one of them (GPUs use NCCL, CPU processes gloo)")
    if gpus == 0:  # the CPU spelling: never a silent fallback from a GPU request
        if device not in ("auto", "cpu"):
            raise UserError(f"--gpus 0 trains on the CPU; it contradicts --device {device}")
        device = "cpu"
    elif gpus is not None and gpus < 0:
        raise UserError(f"--gpus must be 0 (the CPU) or more, got {gpus}")
    if gpus:
        device = "cuda"
    elif procs and device == "auto":
        device = "cpu"
    per_node = gpus or procs or 1
    if (per_node > 1 or nodes > 1) and not under_launcher():
        worker_args = [
            "--data", str(data), "--tokenizer", str(tokenizer), "--model", str(model), "--resume", resume,
            "--device", device, "--params", str(params), *[a for s in sets or [] for a in ("--set", s)],
            *(["--allow-data-change"] if allow_data_change else []),
        ]
        cmd = launcher_command(CLI_MODULE, ["train", *worker_args], per_node, nodes, node_rank, master_addr,
                               master_port, rdzv_endpoint)
        world = per_node * nodes
        if dry_run:
            _print_plan(cmd, p.train, world)
            return
        if gpus:
            import torch

            if torch.cuda.device_count() < gpus:
                raise UserError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                                "(--device cpu --procs N runs several CPU processes)")
        raise typer.Exit(_run_launcher(cmd))
    if dry_run:
        _print_plan(None, p.train, 1)
        return
    _train_here(p, data, tokenizer, model, resume, allow_data_change, device)


def _train_here(p, data, tokenizer, model, resume, allow_data_change, device) -> None:
    from pipeline.train.loop import INTERRUPTED_EXIT_CODE, Preempted
    from pipeline.train.loop import train as run_training

    try:
        metrics = run_training(p, data, tokenizer, model, resume, allow_data_change, device)
    except Preempted as e:
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops at the next step, with a checkpoint)
        print(f"interrupted: stopped at once, mid-step; rerun to continue from the last checkpoint in "
              f"{p.train.out_dir}", file=sys.stderr)
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line from rank 0
        shown = {k: v for k, v in metrics.items() if v is not None and not isinstance(v, dict)}  # not per source
        summary = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        print("done: " + summary, file=sys.stderr)


def _run_launcher(cmd: list[str]) -> int:
    """Run torchrun in its own process group; pass stop signals to every process in it."""
    from pipeline.train.loop import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
    from pipeline.train.runlock import held_fds

    # torchrun inherits the out_dir lock: it stays held while torchrun lives, even if this process is killed.
    child = subprocess.Popen(cmd, start_new_session=True, pass_fds=held_fds())
    forwarded: list[int] = []

    def forward(signum, frame):
        # torchrun passes a signal on to its workers once more as it shuts down, so a first Ctrl-C goes
        # out as SIGTERM (a worker's second SIGINT would stop it mid-step); a second one kills at once.
        sent = signal.SIGKILL if signum == signal.SIGINT and signal.SIGINT in forwarded else (
            signal.SIGTERM if signum == signal.SIGINT else signum)
        if sent == signal.SIGTERM and signum == signal.SIGINT:
            os.write(2, b"\nCtrl-C: every rank finishes this step and saves (Ctrl-C again stops at once)\n")
        forwarded.append(signum)
        try:
            os.killpg(child.pid, sent)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, forward)
    code = child.wait()
    if forwarded and code != 0:
        return INTERRUPTED_EXIT_CODE if signal.SIGINT in forwarded else PREEMPTED_EXIT_CODE
    if code != 0:
        print(f"error: distributed training failed (torchrun exit code {code}); torchrun's report above names the "
              "failing rank under 'Root Cause'; `--resume auto` continues from the last checkpoint", file=sys.stderr)
        return 1
    return 0


def _print_plan(cmd: list[str] | None, tp, world: int) -> None:
    per_rank = tp.rank_batch
    print("launcher: " + (shlex.join(cmd) if cmd else "(none: one process)"))
    print(f"global batch: {tp.micro_batch_size} micro × {tp.accumulation_steps} accumulation × {world} processes "
          f"= {tp.global_batch(world)} sequences of {tp.seq_len} tokens per step")
    for r in range(world):
        print(f"  rank {r}: samples [{r * per_rank}, {(r + 1) * per_rank}) of each step's global batch, "
              f"{tp.accumulation_steps} micro-batch(es) of {tp.micro_batch_size}")
