"""Hostile and hopeless data, through real tar shards and the real loaders (issue 11's data half,
issue 15's uint8 batches).

* A shard set without one usable sample (another resolution, an empty tar, garbage bytes, a
  compressed tar) stops the torch loader (0-2 workers, 1-2 ranks), the DALI loader (CPU)
  and a Trainer (before its first batch; two ranks under torchrun) with an error that says
  why; a set where only some shards are bad trains on.
* The manifest is checked against model.image_size / model.num_classes before the first batch.
* Skips are logged as they happen (first ones, then summaries), batches carry a bounded report.
* A SIGKILLed trainer leaves no DataLoader worker and no process holding its metrics port.
* Keys that are not plain relative names are bad samples in every reader and in verify.
* A 9600x9600 PNG of ~110 KB is refused from its header, never decoded; compressed shards
  are refused by their magic bytes.
* uint8 batches, converted once, equal the per-sample float conversion exactly.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import logging
import lzma
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import TINY, tiny_config
from ssgan_dist.config import load_config
from ssgan_dist.data import batch as batch_mod
from ssgan_dist.data import dali_loader, prepare, skips
from ssgan_dist.data.batch import step_tensors
from ssgan_dist.data.ordered import OrderedSamples
from ssgan_dist.data.schema import BadSample, decode_sample, encode_sample, key_problem
from ssgan_dist.data.shards import iter_tar, resolve_shards
from ssgan_dist.data.skips import KEPT_REASONS, NoUsableSample, SkipLog
from ssgan_dist.data.synthetic import make_scene
from ssgan_dist.data.tarindex import index_path, write_index
from ssgan_dist.data.torch_loader import build_torch_loader
from ssgan_dist.data.verify import verify
from ssgan_dist.data.writer import MANIFEST, BadSource, build_synthetic_shards
from ssgan_dist.distributed.env import DistEnv, setup
from ssgan_dist.errors import SetupError
from ssgan_dist.tasks.gan import SERIES
from ssgan_dist.telemetry import PrometheusTelemetry
from ssgan_dist.train import Trainer

needs_dali = pytest.mark.skipif(not dali_loader.dali_available(), reason="NVIDIA DALI is not installed")
LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]
CPU = torch.device("cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOPELESS = {  # a shard set without one usable sample for a 32 px model -> words of the error
    "resolution": ["every sample is bad", "wrong size", "is 64x64, expected 32x32", "model.image_size is 32"],
    "empty": ["no sample could be read", "the tar holds no sample", "empty.tar"],
    "garbage": ["unreadable shard", "unreadable tar", "garbage.tar"],
    "compressed": ["gzip-compressed", "never decompressed", "zipped.tar"],
}


# -- shard sets --------------------------------------------------------------------------


def _good(directory: Path, count: int = 8, size: int = 32, seed: int = 1) -> Path:
    build_synthetic_shards(directory, count=count, samples_per_shard=4, size=size, seed=seed, num_classes=20)
    return directory


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(32, 127, 20000, dtype=np.uint8).tobytes())


def _hopeless(directory: Path, case: str) -> Path:
    """A shard set of one kind of hopeless data (see HOPELESS)."""
    if case == "resolution":
        return _good(directory, size=64)
    directory.mkdir(parents=True)
    if case == "empty":
        tarfile.open(directory / "empty.tar", "w").close()
    elif case == "garbage":
        _garbage(directory / "garbage.tar")
    elif case == "compressed":
        plain = _good(directory.parent / f"{directory.name}-plain")
        (directory / "zipped.tar").write_bytes(gzip.compress((plain / "shard-000000.tar").read_bytes()))
    return directory


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s: the loader spins instead of stopping")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _torch(shards, *, rank=0, world=1, workers=0, batch=2, on_error="skip", flip=False, size=32):
    return build_torch_loader(resolve_shards(str(shards)), seed=3, rank=rank, world_size=world, num_workers=workers,
                              batch_size=batch, num_classes=20, image_size=size, on_error=on_error, flip=flip)


def _dali(shards, *, rank=0, world=1, batch=2, on_error="skip"):
    return dali_loader.build_dali_loader(resolve_shards(str(shards)), seed=3, rank=rank, world_size=world,
                                         num_workers=1, batch_size=batch, num_classes=20, image_size=32,
                                         on_error=on_error, flip=False, device=CPU)


def _words(text: str, words: list[str]) -> None:
    missing = [w for w in words if w not in text]
    assert not missing, f"{missing} not in:\n{text}"


# -- 1. a full pass without a usable sample stops, a partly bad set trains on ------------------


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("case", HOPELESS)
def test_torch_loader_stops_after_a_pass_without_a_usable_sample(tmp_path, case, workers):
    shards = _hopeless(tmp_path / case, case)
    with deadline(60), pytest.raises(NoUsableSample) as err:
        next(_torch(shards, workers=workers))
    _words(str(err.value), [*HOPELESS[case], "no usable sample in a full pass"])
    assert "Traceback" not in str(err.value)  # the worker's error as raised, not torch's re-raise


@pytest.mark.parametrize("case", ["resolution", "garbage"])
def test_every_rank_of_the_torch_loader_stops(tmp_path, case):
    shards = _hopeless(tmp_path / case, case)
    for rank in (0, 1):
        with deadline(60), pytest.raises(NoUsableSample, match="no usable sample"):
            next(_torch(shards, rank=rank, world=2, workers=1))


@needs_dali
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", HOPELESS)
def test_dali_loader_stops_after_a_pass_without_a_usable_sample(tmp_path, case, world):
    shards = _hopeless(tmp_path / case, case)
    for rank in range(world):
        with deadline(60), pytest.raises(NoUsableSample) as err:
            next(_dali(shards, rank=rank, world=world))
        _words(str(err.value), [*HOPELESS[case][1:], "no usable sample in a full pass"])


@pytest.mark.parametrize("loader", LOADERS)
def test_the_trainer_stops_before_its_first_batch(tmp_path, loader):
    shards = _hopeless(tmp_path / "res", "resolution")
    (shards / MANIFEST).unlink()  # else the manifest check stops it first (tested below)
    cfg = tiny_config(tmp_path / "run", shards, f"data.loader={loader}", "data.num_workers=1")
    with deadline(60), pytest.raises(NoUsableSample) as err:
        Trainer(cfg, setup())
    _words(str(err.value), [f"data.shards={shards}", *HOPELESS["resolution"]])


@pytest.mark.slow
def test_two_ranks_under_torchrun_stop_with_the_reason(tmp_path):
    shards = _hopeless(tmp_path / "garbage", "garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ssgan_dist.train",
         *TINY, f"run.dir={tmp_path / 'run'}", f"data.shards={shards}", "data.num_workers=1", "train.max_steps=5"],
        env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    # The ranks fail alike and the message is printed once (shell.run_cli: once per node), no
    # traceback of ours; the exit codes are the launcher's business (gloo's teardown after an
    # error on both ranks may abort one of them).
    assert proc.stderr.count("error: no usable sample in a full pass") == 1, proc.stderr[-3000:]
    assert "unreadable tar" in proc.stderr and "ssgan_dist/data" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("loader", LOADERS)
def test_a_set_with_some_bad_shards_trains_on(tmp_path, loader):
    shards = _good(tmp_path / "mixed")
    tarfile.open(shards / "empty.tar", "w").close()
    _garbage(shards / "garbage.tar")
    (shards / "zipped.tar").write_bytes(gzip.compress((shards / "shard-000000.tar").read_bytes()))
    _good(tmp_path / "big", count=4, size=64)
    (shards / "big.tar").write_bytes((tmp_path / "big" / "shard-000000.tar").read_bytes())
    cfg = tiny_config(tmp_path / "run", shards, f"data.loader={loader}", "train.max_steps=6", "data.num_workers=1")
    trainer = Trainer(cfg, setup())
    with deadline(120):
        trainer.fit()
    assert trainer.step == 6 and trainer.skipped_samples >= 3  # garbage, zipped and the 64 px samples


# -- 2. the manifest against the model, before the first batch --------------------------------


@pytest.mark.parametrize("spec", ["dir", "pattern"])
def test_manifest_resolution_is_checked_before_the_first_batch(tmp_path, shards32, spec):
    given = str(shards32) if spec == "dir" else str(shards32 / "shard-{000000..000002}.tar")
    cfg = tiny_config(tmp_path / "run", given, "model.image_size=64")
    with pytest.raises(SetupError) as err:
        Trainer(cfg, setup())
    _words(str(err.value), [f"data.shards={given}", str(shards32 / MANIFEST), "32 px", "model.image_size is 64"])


def test_manifest_classes_are_checked_before_the_first_batch(tmp_path, shards32):
    cfg = tiny_config(tmp_path / "run", shards32, "model.num_classes=10", "model.background_classes=[6,7,8,9]")
    with pytest.raises(SetupError) as err:
        Trainer(cfg, setup())
    _words(str(err.value), [f"data.shards={shards32}", "manifest.json", "class 19", "class_histogram",
                            "model.num_classes is 10"])


def test_without_a_manifest_the_run_says_so(tmp_path, caplog):
    shards = _good(tmp_path / "bare")
    (shards / MANIFEST).unlink()
    caplog.set_level(logging.INFO, logger="ssgan_dist.data")
    Trainer(tiny_config(tmp_path / "run", shards), setup())
    assert any("no manifest.json in" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


# -- 3. skips: logged as they happen, counted, a bounded report per batch ----------------------


def test_skips_are_warned_one_by_one_then_summed_up(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="ssgan_dist.data")
    log = SkipLog("test")
    for i in range(25):
        log.skip(BadSample("s.tar", f"k{i}", "image.jpg is 9x9, expected 32x32", "size"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == skips.FIRST_WARNINGS and "k9" in lines[-1] and "summed up" in lines[-1]
    monkeypatch.setattr(skips, "SUMMARY_EVERY_S", 0.0)
    log.skip(BadSample("s.tar", "k25", "label.png holds class 25, but num_classes is 20", "class"))
    assert "skipped 16 more bad samples (15 wrong size, 1 class out of range); 26 in all" in caplog.records[-1].getMessage()


def test_skips_are_logged_before_any_batch_exists(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ssgan_dist.data")
    with pytest.raises(NoUsableSample):
        next(_torch(_hopeless(tmp_path / "res", "resolution")))
    warned = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert len(warned) == 8  # each of the 8 samples as it was met (fewer than FIRST_WARNINGS)


def test_batches_carry_a_count_and_a_bounded_list_of_reasons(tmp_path):
    shards = _good(tmp_path / "mix", count=40, size=64)  # 40 bad samples for a 32 px loader
    _good(tmp_path / "two", count=2)
    (shards / "good.tar").write_bytes((tmp_path / "two" / "shard-000000.tar").read_bytes())
    (shards / MANIFEST).unlink()
    loader = _torch(shards, batch=2)
    batches = [next(loader) for _ in range(3)]  # each holds the 2 good samples: a pass apiece
    for b in batches:
        assert len(b["skipped"].reasons) <= KEPT_REASONS and b["skipped"].count >= len(b["skipped"].reasons)
    assert sum(b["skipped"].count for b in batches) >= 80  # two whole passes over the 40 bad ones


def test_a_workers_bad_sample_reaches_the_trainer_as_raised(tmp_path):
    shards = _hopeless(tmp_path / "res", "resolution")
    with pytest.raises(BadSample) as err:
        next(_torch(shards, workers=1, on_error="raise"))
    assert err.value.kind == "size" and "shard-00000" in str(err.value) and "Traceback" not in str(err.value)


# -- 4. workers die with the trainer; nobody keeps the metrics port ---------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what the next exporter sets
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.slow
def test_a_sigkilled_trainer_leaves_no_worker_and_frees_the_metrics_port(tmp_path, shards32):
    port = _free_port()
    trainer = subprocess.Popen(
        [sys.executable, "-m", "ssgan_dist.train", *TINY, f"run.dir={tmp_path / 'run'}", f"data.shards={shards32}",
         "data.num_workers=2", "train.max_steps=100000", "metrics.enabled=true", f"metrics.port={port}"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        assert _wait(lambda: len(_children(trainer.pid)) >= 2 and not _port_free(port), 180), "no workers started"
        workers = _children(trainer.pid)
        for w in workers:  # stopped, they cannot notice their parent's death themselves (torch's watchdog)
            os.kill(w, signal.SIGSTOP)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
        assert _wait(lambda: not any(_alive(w) for w in workers), 15), [w for w in workers if _alive(w)]
        assert _wait(lambda: _port_free(port), 15), f"port {port} still held after the trainer was killed"
    finally:
        trainer.kill()
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def test_a_forked_child_does_not_hold_the_exporters_socket():
    cfg = load_config("demo", ["metrics.enabled=true", "metrics.port=0"])
    exporter = PrometheusTelemetry(cfg.metrics, DistEnv(0, 1, 0, "node", CPU, "gloo"), job="unit", series=SERIES,
                                   flops_per_image=1e9, precision=cfg.train.precision)
    port = exporter.port
    child = os.fork()
    if child == 0:  # a DataLoader worker, say: lives on after the exporter's process stops serving
        time.sleep(30)
        os._exit(0)
    try:
        exporter.close()
        assert _port_free(port), "the forked child still holds the exporter's listening socket"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


# -- 5. keys: plain relative names or bad samples -------------------------------------------


@pytest.mark.parametrize("key, words", [
    ("../x/evil", "'/'"), ("/abs/evil", "'/'"), ("back\\slash", "'\\\\'"), ("a.b", "'.'"), ("", "empty"),
    ("line\nbreak", "U+000A"), ("bidi\u202eevil", "U+202E"), ("k" * 201, "at most 200"),
])
def test_key_rule(key, words):
    assert words in (key_problem(key) or "")
    with pytest.raises(ValueError, match="sample key"):  # the writers' rule is the same
        encode_sample(key, *make_scene(1, 32)[:3], {})


def test_plain_keys_pass():
    assert all(key_problem(k) is None for k in ("syn000000001", "000000123456", "img_01-a b", "szene-ü"))


HOSTILE = ["../evil/up", "/abs/evil", "back\\slash"]


def _hostile_shards(directory: Path) -> Path:
    """A good shard set plus one tar whose samples have hostile keys (index written)."""
    _good(directory)
    members = encode_sample("x", *make_scene(5, 32)[:3], {})
    with tarfile.open(directory / "hostile.tar", "w") as tar:
        for key in HOSTILE:
            for name, data in members.items():
                if not name.startswith("__"):
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    write_index(directory / "hostile.tar")
    return directory


def test_hostile_keys_are_bad_samples_in_the_torch_loader(tmp_path):
    shards = _hostile_shards(tmp_path / "h")
    loader = _torch(shards, batch=8)
    batches = [next(loader) for _ in range(2)]  # a pass apiece: every hostile sample met at least once
    keys = {k for b in batches for k in b["key"]}
    reasons = [r for b in batches for r in b["skipped"].reasons]
    assert len(keys) == 8 and not keys & set(HOSTILE)
    assert {h for h in HOSTILE if any(repr(h) in r and "plain relative name" in r for r in reasons)} == set(HOSTILE)


@needs_dali
def test_hostile_keys_are_bad_samples_in_dali(tmp_path):
    shards = _hostile_shards(tmp_path / "h")
    loader = _dali(shards, batch=11)
    batch = next(loader)
    assert not set(batch["key"]) & set(HOSTILE) and len(set(batch["key"])) == 8
    # DALI names members as the index does; wds2idx lists them through `tar`, which escapes '\\'
    reasons = batch["skipped"].reasons
    assert batch["skipped"].count == 3 and all("plain relative name" in r and "hostile.tar" in r for r in reasons)
    assert {h for h in HOSTILE[:2] if any(repr(h) in r for r in reasons)} == set(HOSTILE[:2])


def test_hostile_keys_are_reported_by_verify_and_stop_ordered_readers(tmp_path):
    shards = _hostile_shards(tmp_path / "h")
    report = verify(shards, num_classes=20, image_size=32)
    assert all(any(repr(h) in bad and "plain relative name" in bad for bad in report.bad) for h in HOSTILE)
    reader = OrderedSamples([str(shards / "hostile.tar")], num_classes=20, image_size=32)  # generate --shards
    with pytest.raises(BadSample) as err:
        list(reader)
    assert err.value.kind == "key" and err.value.key == HOSTILE[0]


# -- 6. bounds: a huge picture is refused from its header; compressed shards are refused ----------


def _huge_png(side: int = 9600) -> bytes:
    """A grey PNG of side x side zeros, made without holding it: ~110 KB for 92 Mpx."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture
def loads(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of the pictures PIL decodes (ImageFile.load) while the test runs."""
    seen: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self):
        seen.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, at 89 Mpx; ours refuses
def test_a_huge_picture_is_refused_from_its_header(tmp_path, loads):
    huge = _huge_png()
    assert len(huge) < 150_000
    raw = {**encode_sample("big", *make_scene(1, 32)[:3], {}), "sketch.png": huge}
    with pytest.raises(BadSample, match="sketch.png is 9600x9600, expected 32x32") as err:
        decode_sample(raw, shard="s.tar", num_classes=20, image_size=32)
    assert err.value.kind == "size" and (9600, 9600) not in loads
    (tmp_path / "huge.png").write_bytes(huge)
    for opener in (prepare.open_grey, prepare.open_rgb, prepare.open_label):  # shard builders' sources
        with pytest.raises(BadSource, match="huge.png: 9600x9600 pixels"):
            opener(tmp_path / "huge.png")
    assert (9600, 9600) not in loads


@pytest.mark.parametrize("compress, name", [(gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")])
def test_compressed_shards_are_refused_by_their_magic_bytes(tmp_path, shards32, compress, name):
    (tmp_path / "s").mkdir()
    zipped = tmp_path / "s" / "shard-000000.tar"  # the name does not say it
    zipped.write_bytes(compress((shards32 / "shard-000000.tar").read_bytes()))
    with pytest.raises(BadSample, match=f"{name}-compressed") as err:
        list(iter_tar(str(zipped)))
    assert err.value.kind == "tar" and err.value.shard == "shard-000000.tar"
    with pytest.raises(BadSample, match=f"shard-000000.tar: {name}-compressed"):
        next(_torch(tmp_path / "s", on_error="raise"))


# -- 7. uint8 batches, converted once, equal the per-sample float conversion -------------------


def _float_reference(raw: dict) -> dict[str, torch.Tensor]:
    """A sample as the loaders made it before (PIL decode, float conversion per sample)."""
    arrays = {k: np.array(Image.open(io.BytesIO(raw[f"{k}.{ext}"]))) for k, ext in
              (("sketch", "png"), ("label", "png"), ("image", "jpg"))}
    return {"sketch": torch.from_numpy(arrays["sketch"]).float().div_(255.0).unsqueeze(0),
            "label": torch.from_numpy(arrays["label"]).long(),
            "image": torch.from_numpy(arrays["image"]).permute(2, 0, 1).float().div_(127.5).sub_(1.0)}


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_batches_equal_the_float_values_exactly(shards32, workers):
    reference = {raw["__key__"]: _float_reference(raw) for path in sorted(shards32.glob("*.tar"))
                 for raw in iter_tar(str(path), use_index=False)}
    plain, flipped = _torch(shards32, batch=4, workers=workers), _torch(shards32, batch=4, workers=workers, flip=True)
    mirrored = 0
    for _ in range(6):  # one pass over the 24 samples
        a, b = next(plain), next(flipped)
        assert a["key"] == b["key"] and all(a[p].dtype == torch.uint8 for p in ("sketch", "label", "image"))
        x, y = step_tensors(a, CPU), step_tensors(b, CPU)
        for i, key in enumerate(a["key"]):
            ref = reference[key]
            for part in ("sketch", "label", "image"):
                assert x[part][i].dtype == ref[part].dtype and torch.equal(x[part][i], ref[part]), (key, part)
            flip = not torch.equal(y["image"][i], ref["image"])
            mirrored += flip
            for part in ("sketch", "label", "image"):
                assert torch.equal(y[part][i], ref[part].flip(-1) if flip else ref[part]), (key, part)
    assert 0 < mirrored < 24


def test_the_device_path_gives_the_cpus_values():
    """Off the CPU the conversion gathers from a table of the CPU's values; a multiply by the
    reciprocal (what CUDA makes of a division by a scalar) would not give them."""
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    ink, photo = batch_mod._tables(CPU)
    assert torch.equal(batch_mod._lookup(ink, levels), levels.float() / 255.0)
    assert torch.equal(batch_mod._lookup(photo, levels), levels.float() / 127.5 - 1.0)
    assert not torch.equal(levels.float() * (1 / 255.0), levels.float() / 255.0)


def test_an_index_that_does_not_match_the_headers_is_not_used(tmp_path, shards32):
    """A fresh-looking index whose entries point at other members than they name (two
    samples' sketches swapped) is not read by: the samples come from the headers."""
    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes((shards32 / "shard-000000.tar").read_bytes())
    write_index(tar)
    want = list(iter_tar(str(tar), use_index=False))
    assert list(iter_tar(str(tar))) == want
    head, first, second, *rest = index_path(tar).read_text().splitlines()
    a, b = first.split(), second.split()
    at = a.index("sketch.png")
    a[at + 1:at + 3], b[at + 1:at + 3] = b[at + 1:at + 3], a[at + 1:at + 3]
    index_path(tar).write_text("\n".join([head, " ".join(a), " ".join(b), *rest]) + "\n")
    assert list(iter_tar(str(tar))) == want


def test_verify_compares_the_index_member_by_member(tmp_path):
    """An index that leaves out a sample in the middle still looks fresh (the tar ends where
    its last entry does); the loaders would not see that sample, verify says so."""
    shards = _good(tmp_path / "s")
    head, *records = index_path(shards / "shard-000000.tar").read_text().splitlines()
    index_path(shards / "shard-000000.tar").write_text("\n".join([f"v1.2 {len(records) - 1}", records[0],
                                                                  *records[2:]]) + "\n")
    report = verify(shards)
    assert any("shard-000000.tar: DALI index" in p and "out of date" in p for p in report.problems), report.problems
