"""The data side of a training run: the sources it draws from, what it reports about them.

    data = open_train_data(store_path, {"web": 0.6, "code": 0.3, "zh": 0.1}, tp, note, phases=[])
    data.plan(total_steps, global_batch)      # data.phases → the schedule's segments (else one segment)
    data.resume(checkpoint["data"], at)       # a resume: the checkpoint's segments before sample `at`, then the plan
    data.sampler.micro_batches(step, rank, world, micro, accum)   # Batch objects (pipeline/data/sampler.py)
    data.summary(total_steps, global_batch)   # per source: tokens, documents, weight, passes
    data.tokens_seen(step, global_batch)      # per source, exact: the order is a function of the step
    data.checkpoint_record(step, global_batch)   # the checkpoint's data["sources"] and data["segments"]
    evaluate_sources(model, data, tp, device, autocast)   # val loss and bits per byte, per source and overall

Sources with weight 0 are left out: not opened, not required in the store. With
data.phases, the sources with a positive weight in any phase are opened and the
phases' weights replace data.sources' (pipeline/data/mixture.py `phase_segments`).
Which sources are read is `pipeline.data.sources.pick_sources`: data.sources,
or, while that is the shipped default, the store's sources params do not name
(the summary's first line says which rule chose them).
The overall validation loss is the weight-averaged loss of the sources, the
loss on the training mixture; its bits per byte divide that by the
weight-averaged bytes per token (ln 2 · bytes), so the two stay one figure
in two units, as `mm eval`'s do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.mixture import Schedule, Segment, phase_segments, resumed
from pipeline.data.sampler import MixtureSampler, SourceSplit, Windows
from pipeline.data.sources import Weights, pick_sources, unread_note
from pipeline.data.sources import source_weights as weights_of_sources
from pipeline.data.store.reader import TokenStore, open_store
from pipeline.errors import UserError
from pipeline.evaluate.scoring import Score, score_tokens
from pipeline.params import Params, TrainParams


@dataclass
class TrainData:
    store: TokenStore
    names: list[str]
    weights: list[float]
    sampler: MixtureSampler
    val: dict[str, Windows]
    """Validation windows of each source that has at least one."""
    byte_lengths: np.ndarray | None = None
    """UTF-8 bytes of each token id (scoring.token_byte_lengths): validation reports bits per byte with them."""
    phases: list = field(default_factory=list)
    """data.phases as loaded ([] = data.sources' weights all run long)."""
    chosen_by: str = "data.sources"
    """The rule that chose the sources (pipeline/data/sources.py pick_sources), for the summary."""

    @property
    def mixture_key(self) -> str:
        """What decides the data order besides the store and the step: the schedule's segments
        (normalised weights from each start sample) and window_start. A resume whose key differs
        is refused without --allow-data-change."""
        return f"{self.sampler.schedule.key()} window_start={self.sampler.windows[0].window_start}"

    def plan(self, total_steps: int, global_batch: int) -> None:
        """The run's planned schedule: data.phases placed over total_steps, or (no phases) the one
        segment of data.sources' weights the sampler starts with."""
        if self.phases:
            self.sampler.set_schedule(Schedule(phase_segments(self.phases, self.names, total_steps, global_batch)))
            self._weigh_by_last_segment()

    def resume(self, checkpoint_data: dict, at: int) -> str:
        """Continue a checkpoint's schedule at global sample `at` (mixture.resumed): its segments
        before `at` are what was trained; the plan applies from `at` on, each source carrying on
        from its consumed position. Returns the new mixture_key."""
        history = [Segment.from_record(r) for r in checkpoint_data.get("segments") or []]
        if not history and isinstance(checkpoint_data.get("sources"), dict):  # saved before segments were
            history = [Segment(0, tuple((n, float(e["weight"])) for n, e in checkpoint_data["sources"].items()))]
            # Its data_mixture wrote weights to 6 digits: compare this run with its weights in today's words.
            window_start = checkpoint_data.get("data_mixture", "").rpartition(" window_start=")[2]
            if window_start:
                checkpoint_data["data_mixture"] = f"{Schedule(history).key()} window_start={window_start}"
        self.sampler.set_schedule(Schedule(resumed(history, self.sampler.schedule.segments, at)))
        self._weigh_by_last_segment()
        return self.mixture_key

    def _weigh_by_last_segment(self) -> None:
        """self.weights: the mixture the run ends on, which validation's overall figures average by."""
        last = dict(self.sampler.schedule.segments[-1].weights)
        self.weights = [float(last.get(n, 0.0)) for n in self.names]

    @property
    def n_windows(self) -> int:
        """Training windows of all sources together: what train.epochs counts passes over."""
        return sum(w.n_windows for w in self.sampler.windows)

    def samples_seen(self, step: int, global_batch: int) -> dict[str, int]:
        return self.sampler.samples_per_source(step * global_batch)

    def tokens_seen(self, step: int, global_batch: int) -> dict[str, int]:
        """Tokens (inputs) of each source in steps 0 .. step-1."""
        return {k: n * self.sampler.seq_len for k, n in self.samples_seen(step, global_batch).items()}

    def weights_at(self, step: int, global_batch: int) -> dict[str, float]:
        """The weights (as given) of the schedule's segment that holds `step`'s first sample."""
        schedule = self.sampler.schedule
        segment = [s for s in schedule.segments if s.start <= step * global_batch][-1]
        return dict.fromkeys(self.sampler.samples_per_source(0), 0.0) | dict(segment.weights)

    def checkpoint_record(self, step: int, global_batch: int) -> dict:
        """What a checkpoint records of the data order besides the fingerprints: "segments" (the
        schedule, which a resume continues) and "sources" (read by the model card): per source the
        weight in effect at `step`, the tokens of its train split (None for a source only earlier
        segments drew from, not opened now) and the tokens drawn from it in steps 0 .. step-1."""
        seen, weights = self.tokens_seen(step, global_batch), self.weights_at(step, global_batch)
        sources = {name: {"weight": weights.get(name, 0.0),
                          "train_tokens": self.store.sources[name].train.n_tokens if name in self.names else None,
                          "tokens_trained": count}
                   for name, count in seen.items()}
        return {"sources": sources, "segments": self.sampler.schedule.records()}

    def summary(self, total_steps: int, global_batch: int) -> str:
        """A table, one row per source: tokens and documents of its train split, normalised
        weight, and the passes over its windows that total_steps make."""
        seen = self.samples_seen(total_steps, global_batch)
        total_w = sum(self.weights)
        rows = [("source", "tokens", "documents", "weight", "passes")]
        for name, weight, windows in zip(self.names, self.weights, self.sampler.windows, strict=True):
            split = self.store.sources[name].train
            rows.append((name, f"{split.n_tokens:,}", f"{split.n_docs:,}", f"{weight / total_w:.3f}",
                         f"{seen[name] / windows.n_windows:.3g}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in rows]
        schedule = self.sampler.schedule
        changes = f"\n  mixture by segment: {schedule.key()}" if len(schedule.segments) > 1 else ""
        return (f"data: {len(self.names)} source{'s' if len(self.names) > 1 else ''} from {self.store.path} "
                f"(chosen by {self.chosen_by}), "
                f"window_start {self.sampler.windows[0].window_start}\n  " + "\n  ".join(lines) + changes)


def source_weights(params: Params) -> Weights:
    """{name: weight} of data.sources, checked (pipeline/data/sources.py), with what open_train_data
    needs to apply the shipped-default rule (pick_sources)."""
    return weights_of_sources(params.data.sources, params.data.text_field)


def open_train_data(store_path: str | Path, weights: dict[str, float], tp: TrainParams, note,
                    phases: list | tuple = ()) -> TrainData:
    """Open the sources with a positive weight (in data.sources, or with phases in any phase) and
    build the sampler; UserErrors name what is wrong. `plan` then places the phases."""
    why = ""  # set when pick_sources reads the store's own sources instead of data.sources
    if phases:
        drawn = {name: 1.0 for name in weights if any(p["weights"].get(name, 0) > 0 for p in phases)}
    else:  # data.sources, or while that is the shipped default the store's own sources
        drawn, why = pick_sources(weights, list(open_store(store_path).sources) if weights_shipped(weights) else [])
    if not drawn:
        raise UserError("data.sources: every weight is 0; at least one source must have a positive weight")
    if why:
        note(why)
    store = open_store(store_path, sources=list(drawn))
    unread = "" if why else unread_note(store.path, store.ignored, weights)  # the rule's line says it all
    if unread:
        note(unread)
    check_text_fields(store, getattr(weights, "text_fields", {}))
    names = list(store.sources)
    for name in names:
        split = store.sources[name].train
        if Windows(split.tokens, split.doc_offsets, tp.seq_len, tp.window_start).n_windows < 1:
            raise UserError(f"{store_path}: source {name!r} has {split.n_tokens} train tokens in {split.n_docs} "
                            f"documents: no window of train.seq_len + 1 = {tp.seq_len + 1} tokens"
                            + (" starting at a document" if tp.window_start == "document" else ""))
    sampler = MixtureSampler(
        [SourceSplit(n, drawn[n], store.sources[n].train.tokens, store.sources[n].train.doc_offsets) for n in names],
        tp.seq_len, tp.seed, tp.window_start)
    val = {}
    for name in names:  # the scorer's windows: every seq_len tokens of the val split
        split = store.sources[name].val
        windows = Windows(split.tokens, split.doc_offsets, tp.seq_len)
        if windows.n_windows:
            val[name] = windows
    return TrainData(store=store, names=names, weights=[drawn[n] for n in names], sampler=sampler, val=val,
                     phases=list(phases), chosen_by="the shipped-default rule: the store's sources outside "
                     "data.sources" if why else "data.sources")


def weights_shipped(weights: dict) -> bool:
    return bool(getattr(weights, "shipped", False))


def check_text_fields(store: TokenStore, text_fields: dict[str, str]) -> None:
    """A source whose params entry names a text_field was tokenized from that field: DVC's tokenize
    stage tracks data.text_field and the source's path, not the entry's own text_field (which an
    entry may leave out, and DVC cannot track a missing key), so a changed one is caught here."""
    for name, wanted in text_fields.items():
        for part in store.sources[name].parts if name in store.sources else []:
            used = part.attrs.get("text_field")
            if used is not None and used != wanted:
                raise UserError(f"data.sources.{name}.text_field: {wanted!r}, but {part.path} was tokenized "
                                f"from {used!r}: tokenize it again (`mm tokenize --source {name} --force`, "
                                f"or `dvc repro -f tokenize@{name}`)")


@dataclass
class Validation:
    """One validation pass: each source's score, and the figures on the training mixture."""

    by_source: dict[str, Score] = field(default_factory=dict)
    loss: float = math.nan
    """Weight-averaged loss per token of the sources (nats)."""
    bits_per_byte: float = math.nan
    """loss / (ln 2 · weight-averaged bytes per token); NaN without byte lengths."""


def evaluate_sources(model, data: TrainData, tp: TrainParams, device, autocast) -> Validation:
    """Validation loss and bits per byte of each source (eval_batches × micro_batch_size windows of its
    val split, evenly spread, scored by pipeline/evaluate/scoring.py as `mm eval` does), and their weight-averaged
    figures (the training mixture's). Every rank scores all of them."""
    scores = {}
    for name in data.val:
        split = data.store.sources[name].val
        scores[name] = score_tokens(model, split.tokens, tp.seq_len, tp.eval_batches * tp.micro_batch_size,
                                    tp.micro_batch_size, device, byte_lengths=data.byte_lengths, autocast=autocast,
                                    source=f"{data.store.path} ({name})",
                                    doc_offsets=split.doc_offsets)  # documents: as training saw them
    model.train()
    result = Validation(by_source=scores)
    weights = {n: w for n, w in zip(data.names, data.weights, strict=True) if n in scores}
    if scores:
        total = sum(weights.values())
        result.loss = sum(weights[n] * s.loss for n, s in scores.items()) / total
        bytes_per_token = sum(weights[n] * s.bytes / s.tokens for n, s in scores.items()) / total
        if data.byte_lengths is not None and bytes_per_token > 0:
            result.bits_per_byte = result.loss / (math.log(2) * bytes_per_token)
    return result
