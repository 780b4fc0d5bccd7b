"""`mm`: the stage commands. Each lives in its own module under stages/.

Nothing heavy (torch, transformers, zarr) is imported here: each command
imports the pipeline inside its body, so `mm --help` answers at once.
"""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="mm",
    help="Pretrain small language models as a chain of stages: "
         "sample → tokenizer → tokenize → config → train → export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _register() -> None:
    # One line per stage; each module imports the pipeline lazily inside its command.
    from stages.sample import sample
    from stages.tokenize import HELP as tokenize_help
    from stages.tokenize import tokenize
    from stages.tokenizer import tokenizer

    app.command("sample")(sample)
    app.command("tokenizer")(tokenizer)
    app.command("tokenize", help=tokenize_help)(tokenize)
    from stages import evaluate, export, generate

    app.command("export", help="Export a checkpoint: Hugging Face directory (--format hf) or GGUF (--format gguf)."
                )(export.export)
    app.command("generate", help="Stream a continuation of a prompt (checkpoint or export dir).")(generate.generate)
    app.command("eval", help="Val loss, perplexity, bits per byte; or benchmark tasks with --tasks.")(evaluate.evaluate)
    from stages import config, train

    app.command("config", help="Write the model architecture (model.json); print params and FLOPs.")(config.config)
    app.command("train", help="Pretrain: mixed precision, gradient accumulation, DDP/FSDP, exact resume.")(train.train)
    from stages import verify

    app.command("verify", help="Check a token store, checkpoint or export byte for byte; "
                                "exit 1 naming the first bad file.")(verify.verify)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    _exit(_run())


def _run() -> int:
    from pipeline.errors import UserError

    _register()
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UserError as e:
        print(f"error: {_rank_prefix()}{e}", file=sys.stderr)
        return 1
    except OSError as e:
        # A path the user gave that cannot be read or written (a directory, no permission, ...).
        if e.filename is None:
            raise
        print(f"error: {_rank_prefix()}{e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _exit(code: int) -> None:
    """Exit; a torchrun worker skips the interpreter's teardown.

    At teardown the garbage collector frees DDP's reducer and with it the gloo
    process group, whose destructor waits for its worker threads while holding
    the GIL, and a worker thread finishing a collective waits for the GIL: the
    rank hangs forever after its work is done (seen in CI). Everything a rank
    writes is already flushed, fsynced and renamed by then, so skipping the
    teardown loses nothing.
    """
    if _distributed_worker():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _distributed_worker() -> bool:
    return os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")


def _rank_prefix() -> str:
    """Under torchrun with several processes, say which rank failed."""
    return f"rank {os.environ.get('RANK', '?')}: " if _distributed_worker() else ""


if __name__ == "__main__":
    main()
