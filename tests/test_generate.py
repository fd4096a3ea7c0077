"""The generate command on a checkpoint of a real training run: outputs, seeds, grids, bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssgan_dist.data.writer import build_synthetic_shards
from ssgan_dist.evaluation.generate import main
from ssgan_dist.grid import Layout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shards32) -> tuple[Path, Path]:
    """The sketch and label PNGs of the first sample of shards32, as a user would have them."""
    out = tmp_path_factory.mktemp("inputs")
    with tarfile.open(shards32 / "shard-000000.tar") as tar:
        names = tar.getnames()
        for part in ("sketch.png", "label.png"):
            member = next(n for n in names if n.endswith(part))
            (out / part).write_bytes(tar.extractfile(member).read())
    return out / "sketch.png", out / "label.png"


def _generate(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def _pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def test_one_input_gives_image_and_mask_of_the_model_size(tmp_path, capsys, trained_checkpoint, inputs):
    sketch, label = inputs
    out = tmp_path / "out" / "scene.png"
    code, err = _generate(capsys, "--checkpoint", trained_checkpoint, "--sketch", sketch, "--label", label,
                          "--out", out)
    assert code == 0, err
    image, mask = Image.open(out), Image.open(tmp_path / "out" / "scene.mask.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert mask.size == (32, 32) and mask.mode == "RGB"


def test_same_seed_same_image_other_seed_other(tmp_path, capsys, trained_checkpoint, inputs):
    sketch, label = inputs
    common = ["--checkpoint", trained_checkpoint, "--sketch", sketch, "--label", label]
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert _generate(capsys, *common, "--seed", seed, "--out", tmp_path / f"{name}.png")[0] == 0
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    assert not np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "c.png"))


def test_a_shard_set_with_styles_and_a_grid(tmp_path, capsys, trained_checkpoint, shards32):
    out, grid = tmp_path / "set", tmp_path / "grid.png"
    code, err = _generate(capsys, "--checkpoint", trained_checkpoint.parent, "--shards", shards32, "--out", out,
                          "--max-samples", 3, "--num-styles", 2, "--grid", grid, "--batch-size", 2)
    assert code == 0, err
    images = sorted(p.name for p in out.glob("*.png") if not p.name.endswith(".mask.png"))
    masks = sorted(p.name for p in out.glob("*.mask.png"))
    assert len(images) == 6 and len(masks) == 6 and all("-style" in n for n in images)
    styles = sorted(out.glob("*-style*.png"))[:2]
    assert not np.array_equal(_pixels(styles[0]), _pixels(styles[1]))  # two styles of one input differ
    # 3 rows of sketch | label | 2 styles | real | mask, 32 px tiles upscaled, with gutters and a header
    height, width = Layout(32, 3, 6).shape
    assert Image.open(grid).size == (width, height)


def _label_png(path: Path, array: np.ndarray, mode: str = "L") -> Path:
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.mark.parametrize("case, words", [
    ("sizes", ["--sketch", "must be the same size"]),
    ("classes", ["--label", "holds class 25", "model.num_classes=20"]),
    ("colour", ["--label", "RGB image"]),
    ("model size", ["model.image_size=32", "16x16"]),
    ("no label", ["--label PNG", "no label map for --sketch"]),
    ("no checkpoint", ["--checkpoint", "no such file"]),
    ("shards resolution", ["--shards", "64x64, expected 32x32", "shard-000000.tar"]),
    ("label with shards", ["--label goes with --sketch"]),
])
def test_bad_inputs_are_clear_errors(tmp_path, capsys, trained_checkpoint, shards32, inputs, case, words):
    sketch, label = inputs
    ckpt = trained_checkpoint
    labels = np.array(Image.open(label))
    args = ["--sketch", sketch, "--label", label]
    if case == "sizes":
        args[1] = _label_png(tmp_path / "s.png", np.full((40, 40), 255, np.uint8))
    elif case == "classes":
        args[3] = _label_png(tmp_path / "l.png", np.where(labels > 0, 25, 0).astype(np.uint8))
    elif case == "colour":
        args[3] = _label_png(tmp_path / "l.png", labels, "RGB")
    elif case == "model size":
        args = ["--sketch", _label_png(tmp_path / "s.png", np.full((16, 16), 255, np.uint8)),
                "--label", _label_png(tmp_path / "l.png", np.zeros((16, 16), np.uint8))]
    elif case == "no label":
        args = ["--sketch", sketch]
    elif case == "no checkpoint":
        ckpt = tmp_path / "missing.pt"
    elif case == "shards resolution":
        build_synthetic_shards(tmp_path / "s64", count=2, samples_per_shard=2, size=64, seed=3, num_classes=20)
        args = ["--shards", tmp_path / "s64"]
    elif case == "label with shards":
        args = ["--shards", shards32, "--label", label]
    code, err = _generate(capsys, "--checkpoint", ckpt, *args, "--out", tmp_path / "o" / "x.png")
    assert code == 2
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "o" / "x.png").exists()


def test_cli_exit_code_and_no_traceback(tmp_path, trained_checkpoint, inputs):
    sketch, label = inputs
    bad = _label_png(tmp_path / "l.png", np.full((32, 32), 200, np.uint8))
    proc = subprocess.run([sys.executable, "-m", "ssgan_dist.evaluation.generate",
                           "--checkpoint", str(trained_checkpoint),
                           "--sketch", str(sketch), "--label", str(bad), "--out", str(tmp_path / "x.png")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "holds class 200" in proc.stderr and "Traceback" not in proc.stderr


def _hostile_shard(directory: Path, key: str) -> Path:
    """A shard whose one sample (a good one) is keyed ``key``, e.g. ../escape/evil."""
    import io

    from ssgan_dist.data.schema import encode_sample
    from ssgan_dist.data.synthetic import make_scene

    directory.mkdir(parents=True)
    members = encode_sample("plain", *make_scene(7, 32)[:3], {"i": 7})  # then stored under `key`
    with tarfile.open(directory / "evil-000000.tar", "w") as tar:
        for name, data in members.items():
            if name.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return directory / "evil-000000.tar"


@pytest.mark.parametrize("key", ["../escape/evil", "ABSOLUTE/evil"])
def test_a_hostile_sample_key_never_writes_outside_out(tmp_path, capsys, trained_checkpoint, key):
    """Issue 11: a tar member named ../x/evil.sketch.png made generate write (and create
    directories) outside --out. Whichever layer stops it (the shard reader refusing the key,
    or generate's own containment), the command fails with exit code 2 and writes nothing
    outside --out."""
    escape = tmp_path / "escape"
    key = key.replace("ABSOLUTE", str(escape))
    shard = _hostile_shard(tmp_path / "shards", key)
    out = tmp_path / "work" / "out"
    code, err = _generate(capsys, "--checkpoint", trained_checkpoint, "--shards", shard, "--out", out)
    assert code == 2 and "Traceback" not in err, err
    assert not escape.exists() and {p.name for p in tmp_path.iterdir()} <= {"shards", "work"}


def test_generate_keeps_every_output_inside_out_on_its_own(tmp_path):
    """The containment check itself, whatever the readers let through: '..', absolute keys
    and a symlink out of --out are refused; plain and nested names inside are fine."""
    from ssgan_dist.evaluation.generate import InputError, inside

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "link").symlink_to(tmp_path)
    assert inside(out, out / "a.png", "a") == out / "a.png"
    assert inside(out, out / "sub" / "b.png", "sub/b")
    for key in ("../a", "sub/../../a", "/etc/passwd", "link/x"):
        with pytest.raises(InputError, match="outside --out"):
            inside(out, out / f"{key}.png", key)
