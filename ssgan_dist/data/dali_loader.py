"""Training batches through NVIDIA DALI (``data.loader=dali``), from the same shards and in
the same batch layout as the torch loader.

DALI reads the tars (``fn.readers.webdataset``, split by sample across ranks with
shard_id/num_shards, shuffled in a buffer seeded per rank), decodes on the CPU
(``device_id=None``) or on the GPU ("mixed"), and mirrors sketch, label and image with one
coin per sample, so the three stay aligned and the label is never interpolated. Python
then makes the checks ``decode_sample`` makes, from the member headers and image shapes
DALI reports, and builds the uint8 batch of ``data.batch`` on the device (the step
converts it to float there, as it does the torch loader's).

Resume: the position is DALI's own pipeline checkpoint (reader progress and the state of
every random generator), taken for the batches actually handed out; a run rebuilt from it
continues with exactly the batches an uninterrupted run would have had. It is only valid
for the same shards, rank, world size, batch size, seed and flips, which load_state_dict
checks. It cannot move between loaders: a torch-loader position refuses to load here.

Equal batches per rank: the stream never ends (``pipe.run()`` reads on into the next
epoch instead of raising StopIteration), so every rank can serve any number of steps
whatever the shard count; no padding (pad_last_batch would repeat samples) is needed.

Bad samples, and where DALI cannot do what the torch loader does:

* missing part, broken or compressed tar: found before the pipeline starts, from the DALI
  index files (or the tar headers). skip: DALI leaves them out
  (missing_component_behavior="skip") and they are logged when found and counted once, by
  rank 0, when a run starts from scratch (the torch loader reports them each time it
  passes them). raise: the loader refuses to start, naming shard and key.
* key that is not a plain name, wrong size, wrong mode, class >= num_classes, bad JSON:
  checked per sample after decoding (DALI decodes in its graph before Python sees a header,
  so a huge picture costs one decode here; the torch loader refuses it from its header).
  skip: a DALI batch cannot be refilled, so a bad sample's place in the batch is taken by
  a copy of a good sample of the same batch (a batch with none is dropped), and the
  sample is logged (``data.skips``) and counted. raise: BadSample naming shard and key.
* nothing usable: every rank reads every sample over ``world_size`` epochs (DALI moves
  the ranks' slices on each epoch), so a rank that has met every complete sample of the
  shard set, all bad, since its last usable one stops with ``NoUsableSample`` quoting the
  reasons by kind, instead of reading on forever.
* undecodable image: DALI stops the whole pipeline and says neither which sample nor
  which shard; it cannot skip it (the DALI maintainers' word: NVIDIA/DALI#3913). Both
  modes stop with an error that points at ``python -m ssgan_dist.data.build verify DIR``, which
  names it, and at data.loader=torch, which skips it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ssgan_dist.data.schema import IMAGE, LABEL, MEMBERS, META, SKETCH, BadSample, key_problem
from ssgan_dist.data.shards import TAR_ERRORS, compressed_tar, unreadable_tar
from ssgan_dist.data.skips import NoUsableSample, SkipLog, Skipped, Tally, hints
from ssgan_dist.data.tarindex import fresh_index, index_path, scan_tar, split_name
from ssgan_dist.errors import SetupError

log = logging.getLogger(__name__)
HEADER = 26  # PNG signature, IHDR length/type, width, height, bit depth, colour type
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SHUFFLE_BUFFER = 1024  # samples held for DALI's shuffle (encoded, ~100 kB each at 256 px)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def _require_dali() -> None:
    if not dali_available():
        raise SetupError("data.loader=dali needs NVIDIA DALI, which is not installed: pip install -e '.[dali-cuda12]' "
                         "or '.[dali-cuda13]' (the machine's CUDA major version), or data.loader=torch")


@dataclass(frozen=True)
class Layout:
    """What a saved DALI position is only valid for."""

    shards: tuple[str, ...]
    rank: int
    world_size: int
    batch_size: int
    seed: int
    flip: bool


def _image_mode(head: bytes, channels: int) -> str:
    """PIL's mode name for what DALI reads: 8-bit grey/RGB PNGs from the header, other
    formats from the channel count DALI's decoder sees."""
    if _is_png(head) and head[12:16] == b"IHDR":
        depth, colour = head[24], head[25]
        return {(8, 0): "L", (8, 2): "RGB"}.get((depth, colour), f"PNG colour type {colour}, {depth}-bit")
    return {1: "L", 3: "RGB"}.get(channels, f"{channels}-channel")


def _is_png(head: bytes) -> bool:
    return head[:8] == PNG_SIGNATURE


def _reason(exc: Exception) -> str:
    """The line of a DALI error that says what went wrong (it ends with the operator's own
    message, then boilerplate)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    useful = [line for line in lines if line and "no longer valid" not in line and not line.startswith("C++ context")]
    return useful[-1] if useful else type(exc).__name__


class DaliShardLoader:
    """Iterates batches forever; ``state_dict()``/``load_state_dict()`` as TorchShardLoader."""

    def __init__(self, shards: list[str], *, seed: int, rank: int, world_size: int, num_threads: int,
                 batch_size: int, num_classes: int, image_size: int, on_error: str, flip: bool,
                 device: torch.device):
        _require_dali()
        self.layout = Layout(tuple(os.path.basename(s) for s in shards), rank, world_size, batch_size, seed, flip)
        self.num_threads, self.num_classes, self.image_size = max(num_threads, 1), num_classes, image_size
        self.on_error, self.device = on_error, device
        self.skip_log, self.tally = SkipLog(f"data (rank {rank}, DALI)"), Tally()
        self.paths, self.index_paths, self.missing, self.samples = self._scan(shards)
        self.names = {path: os.path.basename(path) for path in self.paths}
        if self.samples < world_size:
            raise SetupError(f"data.shards: {self.samples} complete samples cannot be split over {world_size} ranks")
        self.initial_fill = max(1, min(MAX_SHUFFLE_BUFFER, self.samples // world_size))
        self._checkpoint: bytes | None = None
        self._pipe: Any = None
        self._barren: set[str] = set()  # samples met since the last usable one, all bad

    # -- before the pipeline: what DALI would silently leave out --------------------------
    def _scan(self, shards: list[str]) -> tuple[list[str], list[str] | None, Skipped, int]:
        """(readable tars, their index files or None, missing-part reports, complete samples)."""
        paths, indexes, missing, complete = [], [], Skipped(), 0
        bad = functools.partial(self._bad, skipped=missing, logged=self.layout.rank == 0)  # every rank scans alike
        for path in shards:
            shard = os.path.basename(path)
            samples = fresh_index(path)
            indexed = samples is not None
            try:
                with open(path, "rb") as f:
                    if (compressed := compressed_tar(path, f.read(6))) is not None:
                        bad(compressed)
                        continue
                samples = samples if samples is not None else scan_tar(path)
            except TAR_ERRORS as exc:
                bad(unreadable_tar(path, exc))
                continue
            if not samples:
                self.tally.add(BadSample(shard, "<tar>", "the tar holds no sample", "empty"))
                continue  # nothing for DALI to read
            paths.append(path)
            indexes.append(str(index_path(path)) if indexed else None)
            for key, members in samples:
                lacking = [m for m in MEMBERS if m not in {ext for ext, *_ in members}]
                if lacking:
                    bad(BadSample(shard, key, f"missing member(s) {', '.join(lacking)}", "missing"))
                else:
                    complete += 1
        if not complete:
            raise NoUsableSample.after(f"the {len(shards)} shards ({shards[0]}{', ...' if len(shards) > 1 else ''})",
                                       self.tally, hints(self.image_size, self.num_classes))
        if None in indexes:
            log.info("DALI index files missing or stale for some shards: DALI scans the tars at start-up "
                     "(python -m ssgan_dist.data.build writes them; DALI's wds2idx can add them)")
        return paths, None if None in indexes else indexes, missing, complete

    def _bad(self, bad: BadSample, skipped: Skipped, *, logged: bool = True) -> None:
        if self.on_error == "raise":
            raise bad
        skipped.add(str(bad))
        if logged:
            self.skip_log.skip(bad)
        self.tally.add(bad)

    # -- the pipeline ---------------------------------------------------------------
    def _build(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        layout = self.layout

        @pipeline_def(enable_checkpointing=True)
        def graph():
            sketch, label, image, meta = fn.readers.webdataset(
                paths=self.paths, index_paths=self.index_paths, ext=[SKETCH, LABEL, IMAGE, META],
                missing_component_behavior="skip", shard_id=layout.rank, num_shards=layout.world_size,
                random_shuffle=True, initial_fill=self.initial_fill, seed=layout.seed * 1000003 + layout.rank,
                name="reader")
            decoded = [fn.decoders.image(x, device="mixed" if gpu else "cpu", output_type=t)
                       for x, t in ((sketch, types.GRAY), (label, types.GRAY), (image, types.RGB))]
            if layout.flip:  # one coin per sample for all three: they stay aligned
                coin = fn.random.coin_flip(probability=0.5)
                decoded = [fn.flip(x, horizontal=coin) for x in decoded]
            heads = [fn.slice(x, start=[0], end=[HEADER], axes=[0], out_of_bounds_policy="pad")
                     for x in (sketch, label, image)]
            shapes = [fn.peek_image_shape(x, image_type=types.ANY_DATA) for x in (sketch, label, image)]
            return (fn.get_property(sketch, key="source_info"), meta, *heads, *shapes, *decoded)

        pipe = graph(batch_size=layout.batch_size, num_threads=self.num_threads,
                     device_id=(self.device.index or 0) if gpu else None, seed=layout.seed * 1000003 + layout.rank + 1,
                     checkpoint=self._checkpoint)
        try:
            pipe.build()
        except RuntimeError as exc:
            raise SetupError(f"DALI could not start on this rank's shards ({_reason(exc)}); "
                             "`python -m ssgan_dist.data.build verify <shard dir>` checks them") from exc
        return pipe

    def _run(self) -> tuple[Any, ...]:
        try:
            return self._pipe.run()
        except RuntimeError as exc:
            raise SetupError(
                f"DALI stopped on a sample of this rank's shards it could not read or decode ({_reason(exc)}). DALI "
                "names neither the sample nor its shard and cannot skip it (data.on_error=skip does not apply): find "
                "it with `python -m ssgan_dist.data.build verify <shard dir>`, or train with data.loader=torch, "
                "which skips and names it") from exc

    # -- one batch ------------------------------------------------------------------
    def _check(self, j: int, outs: tuple[Any, ...]) -> tuple[str, str] | None:
        """(kind, reason) why sample j of a DALI batch is bad (decode_sample's rules), or None."""
        _, meta, *rest = outs
        heads = [bytes(np.array(h[j])) for h in rest[:3]]
        shapes = [np.array(s[j]).tolist() for s in rest[3:6]]
        for member, head, (h, w, c), want in zip((SKETCH, LABEL, IMAGE), heads, shapes, ("L", "L", "RGB")):
            if (w, h) != (self.image_size, self.image_size):
                return "size", f"{member} is {w}x{h}, expected {self.image_size}x{self.image_size}"
            mode = _image_mode(head, c)
            if mode != want:
                return "mode", f"{member} has mode {mode}, expected {want}"
        if not _is_png(heads[1]):
            return "format", f"{LABEL} is not a PNG, expected lossless PNG"
        try:
            ok = isinstance(json.loads(bytes(np.array(meta[j]))), dict)
        except ValueError as exc:
            return "json", f"{META} is not valid JSON: {exc}"
        return None if ok else ("json", f"{META} is not a JSON object")

    def _where(self, info: str) -> tuple[str, str]:
        """(shard name, key) of DALI's source_info "<tar path>:<offset>:<member name>" (the
        path and the name may hold colons themselves; the path is one of ours)."""
        cut = info.find(":")
        while cut >= 0 and info[:cut] not in self.names:
            cut = info.find(":", cut + 1)
        member = info[cut + 1:].partition(":")[2] if cut >= 0 else info
        split = split_name(member)
        return self.names.get(info[:cut], "?"), split[0] if split else member

    def _batch(self, skipped: Skipped) -> dict[str, Any] | None:
        """The next DALI batch as a loader batch, None if none of its samples is usable."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        outs = self._run()
        infos = [bytes(np.array(outs[0][j])).decode() for j in range(len(outs[0]))]
        where = [self._where(info) for info in infos]
        reasons = [("key", problem) if (problem := key_problem(key)) else self._check(j, outs)
                   for j, (_, key) in enumerate(where)]
        good = [j for j, r in enumerate(reasons) if r is None]
        s = self.image_size
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        parts = [torch.empty(len(good), s, s, c, dtype=torch.uint8, device=self.device) for c in (1, 1, 3)]
        for k, j in enumerate(good):
            for dst, src in zip(parts, outs[-3:]):
                feed_ndarray(src[j], dst[k], cuda_stream=stream)
        sketch, label, image = parts
        tops = label.flatten(1).amax(1).tolist() if good else []
        for j, top in zip(good, tops):
            if top >= self.num_classes:
                reasons[j] = ("class", f"{LABEL} holds class {top}, but num_classes is {self.num_classes}")
        keep = [k for k, j in enumerate(good) if reasons[j] is None]
        if keep:
            self._barren.clear()
            if self.tally.kinds:
                self.tally = Tally()
        for j, reason in enumerate(reasons):
            if reason is not None:
                self._bad(BadSample(*where[j], reason[1], reason[0]), skipped)
                self._barren.add(infos[j])
        if len(self._barren) >= self.samples:
            self.skip_log.flush()
            shards = self.layout.shards
            raise NoUsableSample.after(f"the {len(shards)} shards ({shards[0]}{', ...' if len(shards) > 1 else ''}), "
                                       f"all {self.samples} complete samples", self.tally,
                                       hints(self.image_size, self.num_classes))
        if not keep:
            return None
        fill = [keep[i % len(keep)] for i in range(self.layout.batch_size)]  # bad ones' places: copies
        index = torch.tensor(fill, device=self.device)
        return {
            "key": [where[good[k]][1] for k in fill],
            "sketch": sketch[index, ..., 0].unsqueeze(1),
            "label": label[index, ..., 0],
            "image": image[index].permute(0, 3, 1, 2),
        }

    # -- the TorchShardLoader interface -------------------------------------------------
    def __iter__(self) -> "DaliShardLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        skipped = Skipped()
        if self._pipe is None:
            if self._checkpoint is None and self.layout.rank == 0:
                skipped = Skipped(self.missing.count, list(self.missing.reasons))  # once per run, not on resume
            self._pipe = self._build()
        while True:
            batch = self._batch(skipped)
            if batch is not None:
                return {**batch, "skipped": skipped}

    def state_dict(self) -> dict[str, Any]:
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"loader": "dali", "checkpoint": checkpoint, "layout": asdict(self.layout)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("loader") != "dali":
            raise SetupError("data.loader: the checkpoint's data position was saved by the torch loader; resume it "
                             "with data.loader=torch (or start over with checkpoint.resume=false)")
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["layout"].items()}
        differ = [k for k, v in asdict(self.layout).items() if saved.get(k) != v]
        if differ:
            raise SetupError(f"data: the checkpoint's DALI position was saved for other {', '.join(differ)} "
                             f"({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); it cannot be resumed exactly")
        self._checkpoint, self._pipe = state["checkpoint"], None


def build_dali_loader(shards: list[str], *, seed: int, rank: int, world_size: int, num_workers: int,
                      batch_size: int, num_classes: int, image_size: int, on_error: str, flip: bool,
                      device: torch.device) -> DaliShardLoader:
    """``data.num_workers`` becomes DALI's thread count (at least 1)."""
    return DaliShardLoader(shards, seed=seed, rank=rank, world_size=world_size, num_threads=num_workers,
                           batch_size=batch_size, num_classes=num_classes, image_size=image_size,
                           on_error=on_error, flip=flip, device=device)
