"""Read what each tracker wrote back, with the library's own reader where it has one.

  tensorboard  tensorboard's EventAccumulator over the run directory
  wandb        the .wandb transaction log of each offline run directory: LevelDB-log
               framing (wandb 0.31 ships its reader only inside wandb-core, in Go),
               each record decoded with wandb's own protobuf (wandb_internal_pb2.Record)
  swanlab      swanlab's own DataStoreReader over the .swanlab file, decoded with its
               Record protobuf

Each returns {metric key: [(step, value), ...]} in the order the records were written.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def tensorboard_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = [t for t in acc.Tags()["tensors"] if acc.SummaryMetadata(t).plugin_data.plugin_name == "scalars"]
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in scalars}


def tensorboard_texts(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [t for t in acc.Tags()["tensors"] if acc.SummaryMetadata(t).plugin_data.plugin_name == "text"]


def leveldb_records(path: Path) -> list[bytes]:
    """The records of a LevelDB-log file (7-byte file header, 32 KiB blocks, crc32 per chunk)."""
    data, pos, out, partial = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        if kind == 0 or len(chunk) < n or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            break  # the end of what a killed writer managed to write
        pos += 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            out.append(partial + chunk)
    return out


def runs_by_id(directory: Path, pattern: str) -> dict[str, list[Path]]:
    """{run id: its files matching pattern (named run-<id>.<ext>)}, fragments in start order."""
    runs: dict[str, list[Path]] = {}
    for path in sorted(directory.glob(pattern)):
        runs.setdefault(path.stem.removeprefix("run-"), []).append(path)
    return runs


def wandb_runs(wandb_dir: Path) -> dict[str, list[Path]]:
    return runs_by_id(wandb_dir, "offline-run-*/run-*.wandb")


def wandb_history(files: list[Path]) -> dict[str, list[tuple[int, float]]]:
    from wandb.proto.wandb_internal_pb2 import Record

    series: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        for raw in leveldb_records(path):
            record = Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            step = int(items.get("_step", record.history.step.num))
            for key, value in items.items():
                if not key.startswith("_") and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def swanlab_runs(log_dir: Path) -> dict[str, list[Path]]:
    return runs_by_id(log_dir, "run-*/run-*.swanlab")


def swanlab_history(files: list[Path]) -> dict[str, list[tuple[int, float]]]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    series: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        reader = DataStoreReader()
        reader.open(path)
        for raw in reader:
            record = Record()
            record.ParseFromString(raw)
            if record.HasField("scalar"):
                s = record.scalar
                series.setdefault(s.key, []).append((s.step, s.value.number))
        reader.close()
    return series


def swanlab_texts(files: list[Path]) -> list[str]:
    """Keys of the text (media) records."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    keys = []
    for path in files:
        reader = DataStoreReader()
        reader.open(path)
        for raw in reader:
            record = Record()
            record.ParseFromString(raw)
            if record.HasField("media"):
                keys.append(record.media.key)
        reader.close()
    return keys
