"""Data pipeline throughput: samples per CPU-second of the shard loaders against a plain
per-file PIL loader, and the share of a demo training step spent waiting for data.

    python bench/data_throughput.py [--samples 512] [--size 256] [--batch 8] [--repeats 3] [--profile]

Every loader runs in this process on one thread (torch threads = 1, DataLoader and torch
loader with num_workers=0, DALI with num_threads=1) over the same synthetic samples, and
is charged the CPU time of the whole process (all its threads), so "per CPU-second" is
per core even on a busy machine; the best of --repeats passes is kept. The folder loaders
do what SPADE's Pix2pixDataset does per sample: open each file with PIL, convert to float
tensors, flip.

* folder-png: sketch, label and photo as one PNG each (SketchyCOCO ships PNG photos).
* folder-jpg: the same with the photo as the very JPEG bytes the shards hold.
* folder-png-640x480: the same samples at a COCO-like source size, resized to the training
  size at load time as SPADE does (photo bicubic, label and sketch nearest): what reading
  the raw dataset costs, for context; the targets compare against folder-png.
* torch: ssgan_dist.data.torch_loader, its uint8 batches: what a loader process costs when
  the step runs on a GPU (the step converts the batch there).  torch+float: the same plus
  ``data.batch.step_tensors`` on the CPU, the conversion a CPU run pays (the folder loaders
  hand out floats: this is the like-for-like row).  dali-cpu(+float): the DALI loader on CPU.

--profile: where the torch+float loader's CPU time goes, each part timed alone.

Data wait: the demo preset's Trainer (64 px) over each shard loader with its default
background worker (data.num_workers=1), timing ``next(loader)`` against ``train_step``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssgan_dist.config import load_config  # noqa: E402
from ssgan_dist.data.batch import step_tensors  # noqa: E402
from ssgan_dist.data.dali_loader import build_dali_loader, dali_available  # noqa: E402
from ssgan_dist.data.shards import resolve_shards  # noqa: E402
from ssgan_dist.data.torch_loader import build_torch_loader  # noqa: E402
from ssgan_dist.data.writer import build_synthetic_shards  # noqa: E402
from ssgan_dist.distributed.env import setup  # noqa: E402
from ssgan_dist.train import Trainer  # noqa: E402


class FolderDataset(Dataset):
    """SPADE-style: one file per part, decoded with PIL at __getitem__."""

    def __init__(self, root: Path, image_ext: str, size: int):
        self.root, self.image_ext, self.size = root, image_ext, size
        self.stems = sorted(p.stem for p in (root / "label").glob("*.png"))

    def _open(self, path: Path, mode: str, resample: int) -> torch.Tensor:
        img = Image.open(path).convert(mode)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample)
        return torch.from_numpy(np.array(img))

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> dict:
        stem = self.stems[i]
        label = self._open(self.root / "label" / f"{stem}.png", "L", Image.NEAREST).long()
        sketch = self._open(self.root / "sketch" / f"{stem}.png", "L", Image.NEAREST)
        image = self._open(self.root / "image" / f"{stem}{self.image_ext}", "RGB", Image.BICUBIC)
        sample = {"key": stem, "label": label, "sketch": sketch.float().div_(255).unsqueeze(0),
                  "image": image.permute(2, 0, 1).float().div_(127.5).sub_(1)}
        if torch.rand(()) < 0.5:
            sample = {k: v.flip(-1) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
        return sample


def write_folders(shard_dir: Path, out: Path, source: Path) -> None:
    """The shards' samples as sketch/label PNG files and the photo as PNG and as the same
    JPEG (``out``), and all three as PNGs at 640x480 (``source``)."""
    import webdataset as wds

    for root, part in [(r, p) for r in (out, source) for p in ("sketch", "label", "image")]:
        (root / part).mkdir(parents=True)
    for raw in wds.WebDataset(resolve_shards(str(shard_dir)), shardshuffle=False):
        key = raw["__key__"]
        (out / "sketch" / f"{key}.png").write_bytes(raw["sketch.png"])
        (out / "label" / f"{key}.png").write_bytes(raw["label.png"])
        (out / "image" / f"{key}.jpg").write_bytes(raw["image.jpg"])
        photo = Image.open(io.BytesIO(raw["image.jpg"]))
        photo.save(out / "image" / f"{key}.png")
        photo.resize((640, 480), Image.BICUBIC).save(source / "image" / f"{key}.png")
        for part in ("sketch", "label"):
            Image.open(io.BytesIO(raw[f"{part}.png"])).resize((640, 480), Image.NEAREST).save(source / part / f"{key}.png")


def timed(batches, n: int) -> tuple[float, float]:
    """(wall s, process CPU s) for n batches after one warm-up batch."""
    next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(batches)
    return time.perf_counter() - wall, time.process_time() - cpu


def loaders(shard_dir: Path, folder_dir: Path, source_dir: Path, size: int, batch: int) -> dict:
    """name -> a function that starts that loader (an endless batch iterator)."""
    shards = resolve_shards(str(shard_dir))
    common = dict(seed=0, rank=0, world_size=1, num_workers=0, batch_size=batch, num_classes=20,
                  image_size=size, on_error="skip", flip=True)

    def folder(root: Path, ext: str):
        while True:
            yield from DataLoader(FolderDataset(root, ext, size), batch_size=batch, shuffle=True, num_workers=0)

    def as_float(batches):
        for batch in batches:
            yield step_tensors(batch, torch.device("cpu"))

    made = {
        "folder-png": lambda: folder(folder_dir, ".png"),
        "folder-jpg": lambda: folder(folder_dir, ".jpg"),
        "folder-png-640x480": lambda: folder(source_dir, ".png"),
        "torch": lambda: build_torch_loader(shards, **common),
        "torch+float": lambda: as_float(build_torch_loader(shards, **common)),
    }
    if dali_available():
        made["dali-cpu"] = lambda: build_dali_loader(shards, **common, device=torch.device("cpu"))
        made["dali-cpu+float"] = lambda: as_float(build_dali_loader(shards, **common, device=torch.device("cpu")))
    return made


def profile(shard_dir: Path, size: int, batch: int, loader_per_sample: float, repeats: int) -> list[tuple[str, float]]:
    """(part, CPU microseconds per sample) of the torch+float loader, each part timed alone
    over the same samples (best of ``repeats``); the rest is the loader's measured time per
    sample minus the parts. cProfile would charge PIL's many small Python calls its own cost."""
    from ssgan_dist.data.batch import collate
    from ssgan_dist.data.schema import IMAGE, LABEL, SKETCH, decode_sample
    from ssgan_dist.data.shards import iter_tar

    paths = resolve_shards(str(shard_dir))
    raws = [raw for path in paths for raw in iter_tar(path)]

    def best(job) -> float:
        times = []
        for _ in range(repeats):
            start = time.process_time()
            job()
            times.append(time.process_time() - start)
        return 1e6 * min(times) / len(raws)

    def pil() -> None:
        for raw in raws:
            for member in (SKETCH, LABEL, IMAGE):
                np.asarray(Image.open(io.BytesIO(raw[member])))

    def each(job, inputs) -> None:  # results dropped as the loader drops them: memory is reused
        for x in inputs:
            job(x)

    items = [decode_sample(raw, shard="s", num_classes=20, image_size=size) for raw in raws[:batch]]
    flips = [i % 2 == 0 for i in range(batch)]
    collated = collate(items, flips)
    per_batch = len(raws) // batch
    parts = {"reading tars (whole file, cut by the index)": best(lambda: each(lambda p: list(iter_tar(p)), paths)),
             "PIL: open, decode, to numpy (3 pictures)": best(pil)}
    parts["our checks in decode_sample (key, members, JSON, headers, classes)"] = best(lambda: each(
        lambda raw: decode_sample(raw, shard="s", num_classes=20, image_size=size), raws)) - parts[
        "PIL: open, decode, to numpy (3 pictures)"]
    parts["collate and flips (uint8)"] = best(lambda: each(lambda _: collate(items, flips), range(per_batch)))
    parts["float conversion on the CPU (step_tensors)"] = best(
        lambda: each(lambda _: step_tensors(collated, torch.device("cpu")), range(per_batch)))
    parts["the rest (stream loop, order and flip RNG, Python)"] = loader_per_sample - sum(parts.values())
    return list(parts.items())


def data_wait(shard_dir: Path, loader: str, steps: int, run_dir: Path) -> dict:
    cfg = load_config("demo", [f"data.shards={shard_dir}", f"data.loader={loader}", f"run.dir={run_dir}",
                               "train.progress=false"])
    trainer = Trainer(cfg, setup())
    for _ in range(3):  # warm-up: workers started, first batches decoded
        trainer.train_step(next(trainer.data))
    wait = compute = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(trainer.data)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        wait, compute = wait + t1 - t0, compute + t2 - t1
    return {"loader": loader, "steps": steps, "batch": cfg.train.batch_size, "size": cfg.model.image_size,
            "wait_s": wait, "step_s": compute, "wait_fraction": wait / (wait + compute)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="also show where the torch loader's CPU time goes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_synthetic_shards(tmp / "shards", count=args.samples, samples_per_shard=128, size=args.size, seed=0,
                               workers=len(os.sched_getaffinity(0)))
        write_folders(tmp / "shards", tmp / "folder", tmp / "source")
        n = args.samples // args.batch - 1
        results: dict[str, dict] = {}
        made = loaders(tmp / "shards", tmp / "folder", tmp / "source", args.size, args.batch)
        for _ in range(args.repeats):  # interleaved, so a busy spell hits every loader alike
            for name, make in made.items():
                wall, cpu = timed(make(), n)
                best = results.get(name)
                rate = n * args.batch / cpu
                if best is None or rate > best["per_cpu_s"]:
                    results[name] = {"per_cpu_s": rate, "per_wall_s": n * args.batch / wall, "samples": n * args.batch}
        base = results["folder-png"]["per_cpu_s"]
        print(f"\n{args.size}x{args.size}, batch {args.batch}, {n * args.batch} samples per pass, best of {args.repeats}")
        print("| loader | samples / CPU-s | samples / wall-s | vs folder-png |")
        print("|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['per_cpu_s']:.0f} | {r['per_wall_s']:.0f} | {r['per_cpu_s'] / base:.2f}x |")

        shares = profile(tmp / "shards", args.size, args.batch, 1e6 / results["torch+float"]["per_cpu_s"],
                         args.repeats) if args.profile else []
        if shares:
            print("\n| torch+float loader, CPU time per sample | us | share |")
            print("|---|---|---|")
            total = sum(us for _, us in shares)
            for part, us in shares:
                print(f"| {part} | {us:.0f} | {100 * us / total:.0f}% |")

        build_synthetic_shards(tmp / "demo", count=256, samples_per_shard=64, size=64, seed=0)
        waits = [data_wait(tmp / "demo", name, args.train_steps, tmp / f"run-{name}")
                 for name in ("torch", "dali") if name == "torch" or dali_available()]
        print("\n| demo step (64 px, batch 4) | data wait / step | wait fraction |")
        print("|---|---|---|")
        for w in waits:
            print(f"| {w['loader']} | {1000 * w['wait_s'] / w['steps']:.1f} ms / {1000 * w['step_s'] / w['steps']:.0f} ms "
                  f"| {100 * w['wait_fraction']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": results, "data_wait": waits, "profile": shares}, indent=1))


if __name__ == "__main__":
    main()
