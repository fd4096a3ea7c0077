"""`python -m ssgan_dist.summary` and `count_flops`: FLOPs against a closed form of the
architecture (2 FLOPs per multiply-add, convs and linear layers only), parameter counts
against the built models, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssgan_dist.config import load_config
from ssgan_dist.models import build_discriminator, build_generator
from ssgan_dist.summary import count_flops, main

TINY = ["model.image_size=64", "model.ngf=4", "model.ndf=8", "model.spade_hidden=8",
        "model.z_dim=8", "model.sfm_hidden=4"]


def conv_flops(k: int, cin: int, cout: int, res: int) -> int:
    return 2 * k * k * cin * cout * res * res


def generator_flops(m) -> int:
    """SPADE generator (+ ToMask and SFM) per image, normal upsampling."""
    nf, c, h, hs = m.ngf, m.num_classes, m.spade_hidden, m.sfm_hidden
    s = m.image_size // 32
    total = 2 * m.z_dim * 16 * nf * s * s if m.use_z else conv_flops(3, c, 16 * nf, s)
    blocks = [(16 * nf, 16 * nf, s), (16 * nf, 16 * nf, 2 * s), (16 * nf, 16 * nf, 2 * s),
              (16 * nf, 8 * nf, 4 * s), (8 * nf, 4 * nf, 8 * s), (4 * nf, 2 * nf, 16 * s),
              (2 * nf, nf, 32 * s)]
    norm = lambda width, r: conv_flops(3, c, h, r) + 2 * conv_flops(3, h, width, r)  # noqa: E731
    for i, (fin, fout, r) in enumerate(blocks):
        fmid = min(fin, fout)
        total += norm(fin, r) + conv_flops(3, fin, fmid, r) + norm(fmid, r) + conv_flops(3, fmid, fout, r)
        if fin != fout:
            total += norm(fin, r) + conv_flops(1, fin, fout, r)
        if m.sfm and i < len(blocks) - 1:
            # ToMask reads x_i at block i's size; the SFM works at block i+1's (models/sfm.py)
            up = blocks[i + 1][2]
            f_net = lambda cin, r=up: conv_flops(3, cin, hs, r) + conv_flops(3, hs, c, r)  # noqa: E731
            total += conv_flops(3, fout, c, r) + 2 * f_net(2 * c) + f_net(c)
    return total + conv_flops(3, nf, 3, m.image_size)


def discriminator_flops(m) -> int:
    total, n = 0, m.image_size
    for _ in range(m.d_scales):
        widths = [m.num_classes + 3] + [min(m.ndf * 2**i, 512) for i in range(m.d_layers)] + [1]
        strides = [2] * (m.d_layers - 1) + [1, 1]
        r = n
        for cin, cout, stride in zip(widths, widths[1:], strides):
            r = r // stride + 1  # k4, pad 2
            total += conv_flops(4, cin, cout, r)
        n = (n + 1) // 2  # avg-pool 3, stride 2, pad 1
    return total


@pytest.mark.parametrize("sfm", [True, False])
@pytest.mark.parametrize("use_z", [True, False])
def test_count_flops_matches_closed_form(sfm: bool, use_z: bool) -> None:
    cfg = load_config("demo", [*TINY, f"model.sfm={sfm}", f"model.use_z={use_z}"])
    counts = count_flops(cfg)
    assert counts["generator"]["flops"] == generator_flops(cfg.model)
    assert counts["discriminator"]["flops"] == discriminator_flops(cfg.model)
    g, d = build_generator(cfg.model), build_discriminator(cfg.model)
    assert counts["generator"]["params"] == sum(p.numel() for p in g.parameters())
    assert counts["discriminator"]["params"] == sum(p.numel() for p in d.parameters())
    for key in ("params", "flops"):
        assert counts["total"][key] == counts["generator"][key] + counts["discriminator"][key]


def test_count_flops_accepts_model_config_and_scales_with_pixels() -> None:
    cfg = load_config("demo", TINY)
    assert count_flops(cfg.model) == count_flops(cfg)
    # without z every layer is a conv: twice the side, four times the work
    big = count_flops(load_config("demo", [*TINY, "model.image_size=128", "model.use_z=false"]))
    small = count_flops(load_config("demo", [*TINY, "model.use_z=false"]))
    assert big["generator"]["flops"] == 4 * small["generator"]["flops"]


def test_cli_json_and_table(capsys) -> None:
    assert main(["--config", "demo", *TINY, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == count_flops(load_config("demo", TINY))

    assert main(["--config", "demo", *TINY, "model.sfm=false"]) == 0
    table = capsys.readouterr().out
    without_sfm = count_flops(load_config("demo", [*TINY, "model.sfm=false"]))
    assert f"{without_sfm['generator']['params']:,}" in table
    for name in ("generator", "discriminator", "total"):
        assert name in table


def test_cli_bad_key_names_it(capsys) -> None:
    assert main(["--config", "demo", "model.nfg=4"]) == 2
    assert "model.nfg" in capsys.readouterr().err


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "ssgan_dist.summary", "--json", *TINY],
                         capture_output=True, text=True, check=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout) == count_flops(load_config("demo", TINY))


def test_segmenter_config_summarizes_the_segmenter(capsys) -> None:
    from ssgan_dist.models import build_segmenter

    assert main(["--config", "segment-demo", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cfg = load_config("segment-demo")
    assert list(data) == ["segmenter"] and data["segmenter"]["flops"] > 0
    assert data["segmenter"]["params"] == sum(p.numel() for p in build_segmenter(cfg.segmenter, 20).parameters())
