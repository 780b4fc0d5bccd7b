"""Benchmark tasks on an exported model through EleutherAI's lm-evaluation-harness.

`mm eval EXPORT --tasks ...` calls the harness's own Python API
(`lm_eval.simple_evaluate`) with its `hf` backend on the exported directory,
so a number here is the number `lm_eval --model hf` prints for the same
arguments (`harness_arguments` lists them). lm-eval is the optional extra
`mm[bench]`.

Offline first. Unless the environment says otherwise (HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE set to 0), the run is offline: task data must already be
in the local Hugging Face cache (or under `data_dir`, used as HF_HOME) or be
local files that a task YAML points at. Missing data is a one-line UserError
that says how to fetch it once; nothing waits on the network. Where the user
has opted into the network, hub timeouts stay short (a few seconds) unless
they set their own.

Outputs: a flat `{task: {metric: value, metric_stderr: value}}` JSON for
`dvc metrics` and the harness's own results (and per-sample logs) written by
its EvaluationTracker into `output_dir`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.errors import UserError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
SHORT_TIMEOUTS = {"HF_HUB_ETAG_TIMEOUT": "3", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}


def configure_network(data_dir: str | Path | None = None) -> bool:
    """Set the Hugging Face environment before the harness (and datasets, huggingface_hub)
    read it; returns whether the run is offline. Must run before those packages are imported."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir}: not a directory")
        os.environ["HF_HOME"] = str(data_dir.resolve())
        os.environ.pop("HF_HUB_CACHE", None)
        os.environ.pop("HF_DATASETS_CACHE", None)
    online = any(os.environ.get(name, "").strip().lower() in ("0", "false", "no") for name in OFFLINE_VARIABLES[:2])
    if online:
        for name, seconds in SHORT_TIMEOUTS.items():
            os.environ.setdefault(name, seconds)
    else:
        for name in OFFLINE_VARIABLES:
            os.environ.setdefault(name, "1")
    return not online


def harness_arguments(export_dir: str | Path) -> dict:
    """The `hf` backend's model_args mm passes (device and batch size go to simple_evaluate itself):
    fp32 like the rest of mm, BOS in front of each request as training documents start with it
    (the tokenizer does not add it by itself), no remote code."""
    return {"pretrained": str(export_dir), "dtype": "float32", "add_bos_token": True, "trust_remote_code": False}


def check_bos_first(export_dir: str | Path) -> None:
    """The harness asks for BOS only through the tokenizer's `add_bos_token` (harness_arguments), and
    transformers 4.x's PreTrainedTokenizerFast, the class an export names, ignores it: requests would then
    start without the BOS every training document starts with. Load the tokenizer as the harness does and
    check that BOS comes first, rather than trust the version."""
    import transformers
    from transformers import AutoTokenizer

    args = harness_arguments(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(args["pretrained"], add_bos_token=args["add_bos_token"],
                                              trust_remote_code=False)
    ids = tokenizer("def f():")["input_ids"]
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id:
        raise UserError(f"{export_dir}: with transformers {transformers.__version__} its tokenizer does not put "
                        f"BOS ({tokenizer.bos_token!r}) first, so benchmark requests would not start as training "
                        "documents do; transformers 5 honours add_bos_token: pip install -U 'transformers>=5'")


def run_benchmarks(export_dir: str | Path, tasks: list[str], output_dir: str | Path, num_fewshot: int = 0,
                   limit: int | None = None, batch_size: int = 8, device: str | None = None,
                   data_dir: str | Path | None = None) -> dict:
    """Run `tasks` (harness task names or task YAML paths) on an `mm export` directory.

    Returns {"results": {task: {metric: value}}, "config": {...}, "harness": the harness's dict}."""
    from pipeline.hardware import pick_device

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():
        raise UserError(f"{export_dir}: not an exported model directory (benchmarks run on `mm export` output, "
                        "not on a checkpoint: run `mm export` first)")
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("--tasks: no task given (comma-separated harness task names or task YAML files)")
    if num_fewshot < 0 or batch_size < 1 or (limit is not None and limit < 0):
        raise UserError("--num-fewshot and --limit must not be negative, --batch-size at least 1")
    offline = configure_network(data_dir)
    device = str(pick_device(device, local_rank=0))
    try:
        import lm_eval
    except ImportError:
        raise UserError("mm eval --tasks needs lm-evaluation-harness: pip install 'mm[bench]' "
                        "(or pip install lm-eval)") from None
    for spec in tasks:
        if spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
            raise UserError(f"--tasks {spec}: task YAML file not found")

    check_bos_first(export_dir)
    task_manager = _check_task_data(tasks, offline)
    args = harness_arguments(export_dir)
    try:
        results = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, num_fewshot=num_fewshot,
                                          limit=limit or None, batch_size=batch_size, device=device,
                                          log_samples=True, task_manager=task_manager)
    except Exception as e:  # the harness and datasets raise many kinds; map the known ones to one line
        raise _user_error(e, tasks, offline) from None
    if results is None:  # a non-zero rank under torch.distributed; mm runs one process
        raise UserError("lm-eval returned no results")
    _save_harness_files(results, output_dir, export_dir)
    return {"results": flat_metrics(results), "config": {"tasks": tasks, "num_fewshot": num_fewshot,
            "limit": limit or None, "batch_size": batch_size, "device": device, "offline": offline,
            "lm_eval": getattr(lm_eval, "__version__", "?")}, "harness": results}


def _check_task_data(tasks: list[str], offline: bool):
    """Build the tasks (which loads their data) before the model, quietly: missing data is then one
    line, not a model load and the harness's log. The harness builds them again from the cache."""
    import logging

    import datasets
    from lm_eval.tasks import TaskManager, get_task_dict

    quiet = [logging.getLogger(name) for name in ("lm_eval", "datasets", "huggingface_hub", "fsspec")]
    levels = [logger.level for logger in quiet]
    bars = datasets.is_progress_bar_enabled()
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    task_manager = TaskManager()  # indexes the harness's task directories once; simple_evaluate reuses it
    try:
        get_task_dict(tasks, task_manager)
    except Exception as e:  # the harness and datasets raise many kinds; map the known ones to one line
        raise _user_error(e, tasks, offline) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
    return task_manager


def flat_metrics(results: dict) -> dict:
    """{task: {metric: value, metric_stderr: value}} from the harness's results (filter 'none' dropped)."""
    flat = {}
    for task, values in results.get("results", {}).items():
        row = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                continue  # names, counts and N/A stderrs are not metrics
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            row[name] = float(value)
        flat[task] = row
    return flat


def metric_rows(flat: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) rows for the table."""
    rows = []
    for task, values in flat.items():
        for name, value in values.items():
            if name.endswith("_stderr") or "_stderr/" in name:
                continue
            stderr_name = name.replace("/", "_stderr/", 1) if "/" in name else f"{name}_stderr"
            rows.append((task, name, value, values.get(stderr_name)))
    return rows


def _save_harness_files(results: dict, output_dir: str | Path, export_dir: Path) -> None:
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(output_dir))
    tracker.general_config_tracker.model_name = export_dir.name
    tracker.general_config_tracker.model_name_sanitized = export_dir.name
    samples = results.pop("samples", None) or {}
    try:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results.get("configs", {}):
            if task in samples:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    except OSError as e:
        raise UserError(f"{output_dir}: writing the harness's result files failed ({e.strerror or e})") from None


def _user_error(e: Exception, tasks: list[str], offline: bool) -> UserError:
    text = " ".join(str(e).split())[:240] or type(e).__name__
    names = ",".join(tasks)
    if isinstance(e, KeyError) and "not a registered task" in text:
        return UserError(f"--tasks {names}: {text.strip(chr(34) + chr(39))} (see `lm_eval ls tasks`)")
    network_kinds = ("OfflineModeIsEnabled", "ConnectionError", "DatasetNotFoundError", "LocalEntryNotFoundError",
                     "HFValidationError", "FileNotFoundError", "ConnectTimeout", "ReadTimeout")
    kinds = {type(x).__name__ for x in _chain(e)}
    if kinds & set(network_kinds) or "offline" in text.lower() or "couldn't reach" in text.lower():
        if offline:
            return UserError(f"--tasks {names}: task data not in the local cache ({type(e).__name__}); fetch it once "
                             f"with network access: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 mm eval EXPORT --tasks "
                             f"{names} --limit 1 (it lands in the Hugging Face cache), or give --data-dir with a "
                             "cache made elsewhere")
        return UserError(f"--tasks {names}: task data could not be fetched ({type(e).__name__}: {text[:120]}); "
                         "check access to the Hugging Face hub, or run offline with --data-dir")
    return UserError(f"--tasks {names}: lm-eval failed: {type(e).__name__}: {text}")


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__
