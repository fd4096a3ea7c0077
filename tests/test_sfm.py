"""The SFM wired as the paper means it (issue 12): the label signal reaches every block from
step 0, every block is conditioned at its own resolution, a 1-px stroke of M0 reaches the last
block, Mf holds the foreground only, and with the SFM off (or at step 0 of the residual form
with nearest resizing) the generator is SPADE's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssgan_dist.config import ModelConfig
from ssgan_dist.models import build_generator
from ssgan_dist.models.sfm import SFM, foreground_only, resize_labels

C = 20
BACKGROUND = [16, 17, 18, 19]


def tiny(size: int = 64, **kw) -> ModelConfig:
    base = dict(num_classes=C, image_size=size, ngf=4, ndf=8, spade_hidden=8, z_dim=8, sfm_hidden=4)
    return ModelConfig(**{**base, **kw})


def sketch_labels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Sparse stroke-level labels like SketchyCOCO's CLASS_GT: mostly 0, 1-2 px lines of a class."""
    gen = torch.Generator().manual_seed(seed)
    lab = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for _ in range(12):
            cls = int(torch.randint(1, C, (1,), generator=gen))
            y, x0, length = (int(v) for v in torch.randint(0, size, (3,), generator=gen))
            lab[b, y, x0:x0 + length // 2] = cls  # a horizontal stroke
            x = int(torch.randint(0, size, (1,), generator=gen))
            lab[b, y // 2:y // 2 + length // 3, x] = cls  # a vertical one
    return lab


def onehot(lab: torch.Tensor) -> torch.Tensor:
    return F.one_hot(lab, C).permute(0, 3, 1, 2).float()


def block_inputs(g: torch.nn.Module, m0: torch.Tensor) -> tuple[dict, dict, list]:
    """(block name -> its conditioning map, block name -> its input x, masks) for one forward."""
    seg, xin = {}, {}

    def record(name: str):
        def hook(mod, args) -> None:
            xin[name], seg[name] = args[0], args[1]
        return hook

    hooks = [getattr(g, name).register_forward_pre_hook(record(name)) for name, _ in g.schedule]
    with torch.no_grad():
        _, masks = g(m0, torch.zeros(m0.shape[0], g.z_dim), return_masks=True)
    for h in hooks:
        h.remove()
    return seg, xin, masks


@pytest.mark.parametrize("num_upsampling,size", [("normal", 64), ("more", 128)])
def test_every_block_is_conditioned_at_its_own_resolution(num_upsampling: str, size: int) -> None:
    torch.manual_seed(0)
    g = build_generator(tiny(size, num_upsampling=num_upsampling))
    seg, xin, masks = block_inputs(g, onehot(sketch_labels(2, size)))
    for name, _ in g.schedule[1:]:
        assert seg[name].shape[2:] == xin[name].shape[2:], name
    assert seg[g.schedule[-1][0]].shape[-1] == size  # the last block: full resolution
    assert [m.shape[-1] for m in masks] == [xin[name].shape[-1] for name, _ in g.schedule[1:]]


def label_contrast(seg: torch.Tensor, lab: torch.Tensor) -> float:
    """Mean distance of the conditioning vectors of labelled pixels from the mean vector of
    empty paper, at seg's resolution (one-hot M0 itself: sqrt(2))."""
    r = seg.shape[-1]
    small = F.interpolate(lab[:, None].float(), size=(r, r), mode="nearest").long()[:, 0]
    v = seg.permute(0, 2, 3, 1)
    return (v[small > 0] - v[small == 0].mean(0)).norm(dim=1).mean().item()


def test_every_block_carries_m0_layout_at_initialization() -> None:
    """The shipped configuration (the paper's form, PyTorch's default init for ToMask and the
    SFM): at step 0 every block's map tells labelled pixels from empty paper (contrast
    ~0.1-0.2, on a map of magnitude ~1). SPADE's xavier-0.02 init gave ~1e-4 maps (next test)."""
    lab = sketch_labels(2, 64)
    cfg = tiny()
    assert (cfg.sfm_form, cfg.sfm_init, cfg.sfm_resize) == ("paper", "default", "maxpool")
    for seed in range(3):
        torch.manual_seed(seed)
        g = build_generator(cfg)
        seg, _, _ = block_inputs(g, onehot(lab))
        for name, _ in g.schedule[1:]:
            assert 0.05 < label_contrast(seg[name], lab) < 1.0, (seed, name)
            assert seg[name].abs().mean() > 0.05, (seed, name)


def test_kaiming_init_passes_m0_contrast_through_the_sfm() -> None:
    """model.sfm_init=kaiming (variance-preserving F1 and F2): at step 0 the paper's form carries
    M0's layout at close to M0's own contrast (sqrt(2)), not the ~0.2 of PyTorch's default init."""
    lab = sketch_labels(4, 64)
    for seed in range(2):
        torch.manual_seed(seed)
        g = build_generator(tiny(ngf=8, sfm_hidden=16, sfm_init="kaiming"))
        seg, _, _ = block_inputs(g, onehot(lab))
        contrast = [label_contrast(seg[name], lab) for name, _ in g.schedule[1:]]
        assert min(contrast) > 0.1 and sorted(contrast)[len(contrast) // 2] > 0.6, contrast
        assert all((s.f1[0].bias == 0).all() and (s.f2[-1].bias == 0).all() for s in g.sfms)


def test_xavier_init_starves_the_blocks() -> None:
    """Why the SFM is not given SPADE's init: with it every M_i is ~1e-4 at step 0."""
    lab = sketch_labels(2, 64)
    torch.manual_seed(0)
    g = build_generator(tiny(sfm_init="xavier"))
    seg, _, _ = block_inputs(g, onehot(lab))
    for name, _ in g.schedule[1:]:
        assert seg[name].abs().mean() < 1e-3 and label_contrast(seg[name], lab) < 1e-3, name


@pytest.mark.parametrize("resize", ["maxpool", "nearest"])
def test_residual_form_starts_as_m0_at_every_block(resize: str) -> None:
    """The residual form with zeroed last convs (measured, not shipped): at step 0 the map of
    every block is M0 at that block's size, with M0's full contrast."""
    torch.manual_seed(0)
    g = build_generator(tiny(sfm_form="residual", sfm_init="zero", sfm_resize=resize))
    lab = sketch_labels(2, 64)
    m0 = onehot(lab)
    seg, _, _ = block_inputs(g, m0)
    for name, _ in g.schedule[1:]:
        torch.testing.assert_close(seg[name], resize_labels(m0, seg[name].shape[2:], resize))
        assert label_contrast(seg[name], lab) > 1.0


FORMS = [dict(), dict(sfm_form="residual", sfm_init="zero"), dict(sfm_resize="nearest")]


@pytest.mark.parametrize("kw", FORMS, ids=["shipped", "residual-zero", "paper-nearest"])
def test_one_pixel_stroke_reaches_the_last_block(kw: dict) -> None:
    """A single labelled pixel at an odd position (which nearest down-sampling to half size
    drops) reaches the last block's map, at full resolution, at that pixel."""
    torch.manual_seed(0)
    g = build_generator(tiny(**kw)).eval()
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    with_stroke = lab.clone()
    with_stroke[0, 37, 41] = 5
    last = g.schedule[-1][0]
    a = block_inputs(g, onehot(lab))[0][last]
    b = block_inputs(g, onehot(with_stroke))[0][last]
    assert b.shape[-1] == 64
    assert (b - a)[0, :, 37, 41].norm() > 0.05
    if kw.get("sfm_init") == "zero":
        assert b[0, 5, 37, 41] == 1 and a[0, 5].abs().sum() == 0
    # The last block's features depend on that pixel of M0 (SPADE's own init makes the effect
    # tiny at step 0, and the untrained tanh saturates, so it is read off the gradient of the
    # last block's output, not off two images).
    out = []
    g.get_submodule(last).register_forward_hook(lambda mod, args, o: out.append(o) and None)
    m0 = onehot(with_stroke).requires_grad_(True)
    g(m0, torch.randn(1, g.z_dim))
    out[0][0, :, 37, 41].sum().backward()
    assert m0.grad[0, 5, 37, 41].abs() > 0


def test_maxpool_brings_a_one_pixel_stroke_to_every_block() -> None:
    """With max-pool resizing the stroke is present in M0 at every block's resolution, and each
    block's map changes at the stroke's position (nearest drops it below full resolution)."""
    torch.manual_seed(0)
    g = build_generator(tiny()).eval()
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    with_stroke = lab.clone()
    with_stroke[0, 37, 41] = 5
    m0 = onehot(with_stroke)
    a, b = block_inputs(g, onehot(lab))[0], block_inputs(g, m0)[0]
    for name, _ in g.schedule[1:]:
        r = b[name].shape[-1]
        assert resize_labels(m0, (r, r))[0, 5, 37 * r // 64, 41 * r // 64] == 1
        assert (b[name] - a[name])[0, :, 37 * r // 64, 41 * r // 64].norm() > 0.01, name
        assert resize_labels(m0, (r, r), "nearest")[0, 5].sum() == (1 if r == 64 else 0)


def test_mf_has_no_label_where_m0_is_background_or_unlabelled() -> None:
    lab = sketch_labels(2, 32)
    lab[:, :4] = 17  # a background class (sky, say)
    m0 = onehot(lab)
    mf = foreground_only(m0, BACKGROUND)
    keep = (lab > 0) & (lab < 16)
    assert (mf.sum(1)[~keep] == 0).all()
    assert torch.equal(mf.argmax(1)[keep], lab[keep])
    # ... and the SFM uses that Mf: F1([Mf, 0]) is the same for M0 with or without background strokes.
    sfm = SFM(C, 4, BACKGROUND, form="paper", resize="nearest")
    seen = []
    sfm.f1.register_forward_pre_hook(lambda mod, args: seen.append(args[0][: args[0].shape[0] // 2, :C]) and None)
    fg_only = lab.clone()
    fg_only[~keep] = 0
    with torch.no_grad():
        sfm(torch.rand(2, C, 32, 32), m0)
        sfm(torch.rand(2, C, 32, 32), onehot(fg_only))
    torch.testing.assert_close(seen[0], seen[1])


def test_residual_nearest_sfm_is_spade_at_step_0() -> None:
    """SPADE's weights are drawn before the SFM's: at step 0 the residual form with zeroed last
    convs and nearest resizing gives the SPADE generator's output exactly (same seed)."""
    m0 = onehot(sketch_labels(2, 64))
    z = torch.randn(2, 8)
    out = {}
    for sfm in (False, True):
        torch.manual_seed(3)
        g = build_generator(tiny(sfm=sfm, sfm_form="residual", sfm_init="zero", sfm_resize="nearest")).eval()
        with torch.no_grad():
            out[sfm] = g(m0, z)
    assert torch.equal(out[False], out[True])


def test_resize_labels() -> None:
    m0 = onehot(sketch_labels(1, 16))
    assert resize_labels(m0, (16, 16)) is m0
    torch.testing.assert_close(resize_labels(m0, (4, 4), "maxpool"), F.max_pool2d(m0, 4))
    torch.testing.assert_close(resize_labels(m0, (4, 4), "nearest"), F.interpolate(m0, size=(4, 4)))
    torch.testing.assert_close(resize_labels(m0, (32, 32), "maxpool"), F.interpolate(m0, size=(32, 32)))
