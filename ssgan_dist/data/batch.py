"""The batch both training loaders hand out, and the one conversion into what a step trains on.

Layout, uint8 from the shard to the device (a quarter of float32's bytes through collate,
the worker queue, pinning and the host-to-device copy):

    {"key": list[str], "sketch": uint8 [B,1,H,W], "label": uint8 [B,H,W] (class indices),
     "image": uint8 [B,3,H,W], "skipped": skips.Skipped}

The image is a channels-last view of HWC pictures (as decoded, torch loader and DALI
alike); whoever needs a memory format asks for it after the conversion.

``step_tensors`` converts once per batch, on the step's device: sketch float32 in [0, 1],
label int64, image float32 in [-1, 1], exactly ``u8.float() / 255`` and
``u8.float() / 127.5 - 1`` as the CPU computes them (the values the loaders produced when
they converted per sample). On the CPU that is that arithmetic; on an accelerator it is a
gather from a 256-entry table of those CPU values, because CUDA divides by a scalar as a
multiply by its reciprocal, which differs in the last bit for about half of the levels.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

PARTS = ("sketch", "label", "image")


def collate(samples: Sequence[dict[str, Any]], flips: Sequence[bool]) -> dict[str, Any]:
    """Decoded samples (``schema.decode_sample``) as one uint8 batch, each mirrored left-right
    where ``flips`` says (sketch, label and image alike)."""
    n = len(samples)
    h, w = samples[0]["label"].shape
    sketch = torch.empty((n, 1, h, w), dtype=torch.uint8)
    label = torch.empty((n, h, w), dtype=torch.uint8)
    image = torch.empty((n, h, w, 3), dtype=torch.uint8)
    arrays = sketch.numpy()[:, 0], label.numpy(), image.numpy()
    for i, (sample, flip) in enumerate(zip(samples, flips)):
        for array, part in zip(arrays, PARTS):
            array[i] = sample[part]
        if flip:  # torch's flip: numpy's copy of a mirrored HWC view is ten times slower
            for tensor in (sketch[i, 0], label[i], image[i]):
                tensor.copy_(tensor.flip(1))
    return {"key": [s["key"] for s in samples], "sketch": sketch, "label": label, "image": image.permute(0, 3, 1, 2)}


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sketch, image) values of the 256 levels, computed on the CPU, held on ``device``."""
    if device not in _TABLES:
        levels = torch.arange(256, dtype=torch.uint8).float()
        _TABLES[device] = (levels / 255.0).to(device), (levels / 127.5 - 1.0).to(device)
    return _TABLES[device]


def _lookup(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, x.reshape(-1).int()).view(x.shape)


def step_tensors(batch: dict[str, Any], device: torch.device, parts: Sequence[str] = PARTS, *,
                 non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """``parts`` of a loader batch as the tensors a step trains on, on ``device``: the one
    place a batch becomes float (see the module doc); only the parts asked for are moved."""
    on_cpu = device.type == "cpu"
    ink, photo = (None, None) if on_cpu else _tables(device)
    out = {}
    for part in parts:
        x = batch[part].to(device, non_blocking=non_blocking)
        if part == "label":
            out[part] = x.long()
        elif on_cpu:
            out[part] = x.float().div_(255.0) if part == "sketch" else x.float().div_(127.5).sub_(1.0)
        else:
            out[part] = _lookup(ink if part == "sketch" else photo, x)
    return out

