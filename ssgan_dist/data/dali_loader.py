"""Training batches through NVIDIA DALI (``data.loader=dali``), from the same shards and in
the same batch layout as the torch loader.

DALI reads the tars (``fn.readers.webdataset``, split by sample across ranks with
shard_id/num_shards, shuffled in a buffer seeded per rank), decodes on the CPU
(``device_id=None``) or on the GPU ("mixed"), and mirrors sketch, label and image with one
coin per sample, so the three stay aligned and the label is never interpolated. Python
then makes the checks ``decode_sample`` makes, from the member headers and image shapes
DALI reports, and builds ``{"key", "sketch", "label", "image", "skipped"}`` on the device.

Resume: the position is DALI's own pipeline checkpoint (reader progress and the state of
every random generator), taken for the batches actually handed out; a run rebuilt from it
continues with exactly the batches an uninterrupted run would have had. It is only valid
for the same shards, rank, world size, batch size, seed and flips, which load_state_dict
checks. It cannot move between loaders: a torch-loader position refuses to load here.

Equal batches per rank: the stream never ends (``pipe.run()`` reads on into the next
epoch instead of raising StopIteration), so every rank can serve any number of steps
whatever the shard count; no padding (pad_last_batch would repeat samples) is needed.

Bad samples, and where DALI cannot do what the torch loader does:

* missing part, broken tar: found before the pipeline starts, from the DALI index files
  (or the tar headers). skip: DALI leaves them out (missing_component_behavior="skip") and
  they are reported once, by rank 0, when a run starts from scratch (the torch loader
  reports them each time it passes them). raise: the loader refuses to start, naming
  shard and key.
* wrong size, wrong mode, class >= num_classes, bad JSON: checked per sample after
  decoding. skip: a DALI batch cannot be refilled, so a bad sample's place in the batch is
  taken by a copy of a good sample of the same batch (a batch with none is dropped) and
  the sample is reported with shard and key. raise: BadSample naming shard and key.
* undecodable image: DALI stops the whole pipeline and says neither which sample nor
  which shard; it cannot skip it (the DALI maintainers' word: NVIDIA/DALI#3913). Both
  modes stop with an error that points at ``python -m ssgan_dist.data.build verify DIR``, which
  names it, and at data.loader=torch, which skips it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ssgan_dist.data.schema import IMAGE, LABEL, MEMBERS, META, SKETCH, BadSample
from ssgan_dist.data.shards import TAR_ERRORS, unreadable_tar
from ssgan_dist.data.tarindex import fresh_index, index_path, scan_tar
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
        self.paths, self.index_paths, self.missing, samples = self._scan(shards)
        if samples < world_size:
            raise SetupError(f"data.shards: {samples} usable samples cannot be split over {world_size} ranks")
        self.initial_fill = max(1, min(MAX_SHUFFLE_BUFFER, samples // world_size))
        self._checkpoint: bytes | None = None
        self._pipe: Any = None

    # -- before the pipeline: what DALI would silently leave out --------------------------
    def _scan(self, shards: list[str]) -> tuple[list[str], list[str] | None, list[str], int]:
        """(readable tars, their index files or None, missing-part reports, complete samples)."""
        paths, indexes, missing, complete = [], [], [], 0
        for path in shards:
            shard = os.path.basename(path)
            samples = fresh_index(path)
            indexed = samples is not None
            try:
                samples = samples if samples is not None else scan_tar(path)
            except TAR_ERRORS as exc:
                self._bad(unreadable_tar(path, exc), missing)
                continue
            paths.append(path)
            indexes.append(str(index_path(path)) if indexed else None)
            for key, members in samples:
                lacking = [m for m in MEMBERS if m not in {ext for ext, *_ in members}]
                if lacking:
                    self._bad(BadSample(shard, key, f"missing member(s) {', '.join(lacking)}"), missing)
                else:
                    complete += 1
        if not paths:
            raise SetupError("data.shards: no readable shard (see the skipped-sample warnings)")
        if None in indexes:
            log.info("DALI index files missing or stale for some shards: DALI scans the tars at start-up "
                     "(python -m ssgan_dist.data.build writes them; DALI's wds2idx can add them)")
        return paths, None if None in indexes else indexes, missing, complete

    def _bad(self, bad: BadSample, skipped: list[str]) -> None:
        if self.on_error == "raise":
            raise bad
        skipped.append(str(bad))

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
    def _check(self, j: int, outs: tuple[Any, ...]) -> str | None:
        """Why sample j of a DALI batch is bad (decode_sample's rules), or None."""
        _, meta, *rest = outs
        heads = [bytes(np.array(h[j])) for h in rest[:3]]
        shapes = [np.array(s[j]).tolist() for s in rest[3:6]]
        for member, head, (h, w, c), want in zip((SKETCH, LABEL, IMAGE), heads, shapes, ("L", "L", "RGB")):
            mode = _image_mode(head, c)
            if mode != want:
                return f"{member} has mode {mode}, expected {want}"
            if (w, h) != (self.image_size, self.image_size):
                return f"{member} is {w}x{h}, expected {self.image_size}x{self.image_size}"
        if not _is_png(heads[1]):
            return f"{LABEL} is not a PNG, expected lossless PNG"
        try:
            ok = isinstance(json.loads(bytes(np.array(meta[j]))), dict)
        except ValueError as exc:
            return f"{META} is not valid JSON: {exc}"
        return None if ok else f"{META} is not a JSON object"

    def _batch(self) -> tuple[dict[str, Any] | None, list[str]]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        outs = self._run()
        where = [bytes(np.array(outs[0][j])).decode() for j in range(len(outs[0]))]
        shard_key = [(os.path.basename(w.rsplit(":", 2)[0]), os.path.basename(w.rsplit(":", 2)[2]).split(".", 1)[0])
                     for w in where]
        reasons = [self._check(j, outs) for j in range(len(where))]
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
                reasons[j] = f"{LABEL} holds class {top}, but num_classes is {self.num_classes}"
        keep = [k for k, j in enumerate(good) if reasons[j] is None]
        skipped = []
        for j, reason in enumerate(reasons):
            if reason is not None:
                self._bad(BadSample(*shard_key[j], reason), skipped)
        if not keep:
            return None, skipped
        fill = [keep[i % len(keep)] for i in range(self.layout.batch_size)]  # bad ones' places: copies
        index = torch.tensor(fill, device=self.device)
        return {
            "key": [shard_key[good[k]][1] for k in fill],
            "sketch": sketch[index].permute(0, 3, 1, 2).float().div_(255.0),
            "label": label[index, ..., 0].long(),
            "image": image[index].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0),
        }, skipped

    # -- the TorchShardLoader interface -------------------------------------------------
    def __iter__(self) -> "DaliShardLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        skipped: list[str] = []
        if self._pipe is None:
            if self._checkpoint is None and self.layout.rank == 0:
                skipped += self.missing  # reported once per run, not again on resume
            self._pipe = self._build()
        while True:
            batch, bad = self._batch()
            skipped += bad
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
