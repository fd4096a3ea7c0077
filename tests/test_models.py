"""Generator, discriminator, SFM and ToMask: shapes, hand-computed SFM values, wiring,
initialization, and parameter counts against a closed form of NVlabs SPADE's architecture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssgan_dist.config import ModelConfig
from ssgan_dist.models import build_discriminator, build_generator
from ssgan_dist.models.sfm import SFM, ToMask, foreground_only

C = 20


def tiny(size: int, **kw) -> ModelConfig:
    base = dict(num_classes=C, image_size=size, ngf=4, ndf=8, spade_hidden=8, z_dim=8, sfm_hidden=4)
    return ModelConfig(**{**base, **kw})


def random_onehot(batch: int, size: int, num_classes: int = C) -> torch.Tensor:
    labels = torch.randint(0, num_classes, (batch, size, size))
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def mask_resolutions(size: int, num_upsampling: str) -> list[int]:
    """Resolution of every generator block but the first: M_i is made at the size of the block
    it conditions (block i+1), as SPADE conditions every block at its own resolution."""
    ups = {"normal": [0, 1, 0, 1, 1, 1, 1], "more": [0, 1, 1, 1, 1, 1, 1],
           "most": [0, 1, 1, 1, 1, 1, 1, 1]}[num_upsampling]
    res = size // 2 ** sum(ups)
    out = []
    for up in ups:
        res *= 2 if up else 1
        out.append(res)
    return out[1:]


# -------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("sfm", [True, False])
@pytest.mark.parametrize("use_z", [True, False])
def test_generator_and_discriminator_shapes(size: int, sfm: bool, use_z: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny(size, sfm=sfm, use_z=use_z)
    g, d = build_generator(cfg), build_discriminator(cfg)
    m0 = random_onehot(1, size)
    with torch.no_grad():
        image, masks = g(m0, return_masks=True)
        feats = d(m0, image)

    assert image.shape == (1, 3, size, size)
    assert image.min() >= -1 and image.max() <= 1
    expected = mask_resolutions(size, "normal") if sfm else []
    assert [m.shape for m in masks] == [(1, C, r, r) for r in expected]
    assert all(torch.isfinite(m).all() for m in masks)

    # PatchGAN: k4, pad 2 -> n // stride + 1; avg-pool 3/2/1 between scales -> ceil(n / 2)
    assert len(feats) == cfg.d_scales
    n = size
    for scale in feats:
        assert len(scale) == cfg.d_layers + 1
        widths = [min(cfg.ndf * 2**i, 512) for i in range(cfg.d_layers)] + [1]
        strides = [2] * (cfg.d_layers - 1) + [1, 1]
        r = n
        for feat, width, stride in zip(scale, widths, strides):
            r = r // stride + 1
            assert feat.shape == (1, width, r, r)
        n = math.ceil(n / 2)


@pytest.mark.parametrize("num_upsampling,size", [("more", 128), ("most", 128)])
def test_generator_upsampling_variants(num_upsampling: str, size: int) -> None:
    cfg = tiny(size, num_upsampling=num_upsampling)
    g = build_generator(cfg)
    with torch.no_grad():  # batch 2: 'most' starts at 1x1, BatchNorm needs 2 values per channel
        image, masks = g(random_onehot(2, size), return_masks=True)
    assert image.shape == (2, 3, size, size)
    assert [m.shape[-1] for m in masks] == mask_resolutions(size, num_upsampling)
    assert hasattr(g, "up_4") == (num_upsampling == "most")


@pytest.mark.parametrize("size", [64, 128, 256])
def test_sfm_and_tomask_shapes(size: int) -> None:
    r, h = size // 4, 4
    x = torch.randn(1, 16, r, r)
    m = ToMask(16, C)(x)
    assert m.shape == (1, C, r, r) and ((m > 0) & (m < 1)).all()
    out = SFM(C, h, [16, 17, 18, 19])(m, random_onehot(1, size))
    assert out.shape == (1, C, r, r)


# ---------------------------------------------------------------- SFM by hand (eqs. 4-5)


def _set_center_taps(conv: torch.nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Make a 3x3 conv act as a 1x1 conv with the given matrix, so it is easy to follow by hand."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = weight
        conv.bias.copy_(bias)


def _pointwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oi,bihw->bohw", w, x) + b.view(1, -1, 1, 1)


def _avg3x3_valid(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean over the neighbours that exist (no padding counted), by explicit loops."""
    _, _, hh, ww = x.shape
    out = torch.empty_like(x)
    for i in range(hh):
        for j in range(ww):
            window = x[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            out[:, :, i, j] = window.sum(dim=(2, 3)) / (window.shape[2] * window.shape[3])
    return out


def _maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max over each window, by explicit loops."""
    b, c, hh, ww = x.shape
    out = torch.empty(b, c, hh // 2, ww // 2)
    for i in range(hh // 2):
        for j in range(ww // 2):
            out[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].amax(dim=(2, 3))
    return out


@pytest.mark.parametrize("form", ["residual", "paper"])
@pytest.mark.parametrize("resize", ["maxpool", "nearest"])
def test_sfm_matches_hand_computation(form: str, resize: str) -> None:
    torch.manual_seed(0)
    c, h, background = 3, 2, [2]
    sfm = SFM(c, h, background, form=form, resize=resize)
    w = {
        "f1a": torch.tensor([[1.0, -2.0, 0.5, 1.0, 0.0, -1.0], [0.5, 1.0, -1.0, 2.0, 1.0, 0.5]]),
        "f1b": torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.5, 1.0]]),
        "f2a": torch.tensor([[2.0, -1.0, 1.0], [-0.5, 0.5, 1.5]]),
        "f2b": torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.5, -2.0]]),
    }
    b = {"f1a": torch.tensor([0.1, -0.3]), "f1b": torch.tensor([0.0, 0.2, -0.1]),
         "f2a": torch.tensor([-0.2, 0.4]), "f2b": torch.tensor([0.3, 0.0, -0.5])}
    for name, conv in (("f1a", sfm.f1[0]), ("f1b", sfm.f1[2]), ("f2a", sfm.f2[0]), ("f2b", sfm.f2[2])):
        _set_center_taps(conv, w[name], b[name])

    m0 = random_onehot(2, 8, c)  # 8x8 label map, masks at 4x4
    m = torch.rand(2, c, 4, 4)
    got = sfm(m, m0)

    lrelu = lambda t: torch.where(t > 0, t, 0.2 * t)  # noqa: E731
    f1 = lambda t: _pointwise(lrelu(_pointwise(t, w["f1a"], b["f1a"])), w["f1b"], b["f1b"])  # noqa: E731
    f2 = lambda t: _pointwise(lrelu(_pointwise(t, w["f2a"], b["f2a"])), w["f2b"], b["f2b"])  # noqa: E731
    # maxpool: a class is present where any pixel of the 2x2 window holds it; nearest keeps every 2nd pixel
    m0_small = _maxpool2x2(m0) if resize == "maxpool" else m0[:, :, ::2, ::2]
    mf = m0_small.clone()
    mf[:, 0] = 0  # no label
    mf[:, 2] = 0  # class 2 is background
    f0 = f1(torch.cat([mf, torch.zeros_like(m)], 1)) + _avg3x3_valid(f1(torch.cat([m0_small, m], 1)))
    f = f0 + f2(f0)
    torch.testing.assert_close(got, m0_small + f if form == "residual" else f)


def test_residual_sfm_starts_as_m0() -> None:
    """Residual form with model.sfm_init=zero: F1's and F2's last convs start at zero, so
    M_i = M0 at block i+1's size."""
    sfm = SFM(C, 4, [16, 17, 18, 19], form="residual", resize="maxpool")
    sfm.zero_last_convs()
    m0 = random_onehot(2, 16)
    torch.testing.assert_close(sfm(torch.rand(2, C, 8, 8), m0), F.adaptive_max_pool2d(m0, 8))
    assert all((net[-1].weight == 0).all() and (net[-1].bias == 0).all() for net in (sfm.f1, sfm.f2))


def test_tomask_matches_hand_computation() -> None:
    tm = ToMask(2, 3)
    w, b = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, -3.0]]), torch.tensor([0.1, 0.0, -0.2])
    _set_center_taps(tm.conv, w, b)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(tm(x), torch.sigmoid(_pointwise(x, w, b)))


def test_foreground_only_zeroes_background_and_no_label_channels() -> None:
    m0 = random_onehot(2, 6, 5)
    mf = foreground_only(m0, [3, 4])
    assert (mf[:, 3:] == 0).all() and (mf[:, 0] == 0).all()
    assert torch.equal(mf[:, 1:3], m0[:, 1:3])


# ----------------------------------------------------------------- generator wiring


def test_sfm_output_conditions_the_next_block() -> None:
    torch.manual_seed(0)
    g = build_generator(tiny(64))
    m0 = random_onehot(1, 64)
    names = [name for name, _ in g.schedule]
    block_in, block_out, tomask_in, sfm_out = {}, {}, {}, {}
    for name in names:
        block = getattr(g, name)
        block.register_forward_pre_hook(lambda mod, args, name=name: block_in.__setitem__(name, args[1]))
        block.register_forward_hook(lambda mod, args, out, name=name: block_out.__setitem__(name, out))
    for i, (tm, sfm) in enumerate(zip(g.to_masks, g.sfms)):
        tm.register_forward_pre_hook(lambda mod, args, i=i: tomask_in.__setitem__(i, args[0]))
        sfm.register_forward_hook(lambda mod, args, out, i=i: sfm_out.__setitem__(i, out))
    with torch.no_grad():
        _, masks = g(m0, return_masks=True)

    assert len(g.sfms) == len(names) - 1
    assert block_in[names[0]] is m0
    for i in range(len(names) - 1):
        assert tomask_in[i] is block_out[names[i]]
        assert block_in[names[i + 1]] is sfm_out[i]
        assert masks[i] is sfm_out[i]  # the inspectable masks are the SFM's M_i, not ToMask's m_i


def test_use_z_determinism_and_noise() -> None:
    torch.manual_seed(0)
    g = build_generator(tiny(64, sfm=False)).eval()  # eval: spectral norm's power step is fixed
    m0 = random_onehot(2, 64)
    z = torch.randn(2, 8)
    with torch.no_grad():
        a, b, other = g(m0, z), g(m0, z), g(m0, torch.randn(2, 8))
        torch.manual_seed(5)
        drawn = g(m0)
        torch.manual_seed(5)
        explicit = g(m0, torch.randn(2, 8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)
    assert torch.equal(drawn, explicit)


def test_seeded_construction_is_deterministic() -> None:
    cfg = tiny(64)
    torch.manual_seed(3)
    first = build_generator(cfg).state_dict()
    torch.manual_seed(3)
    second = build_generator(cfg).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_weight_init_is_spade_xavier() -> None:
    torch.manual_seed(0)
    g = build_generator(tiny(64))
    conv = g.head_0.conv_0  # spectral-normed: the trainable weight is weight_orig
    fan = conv.weight_orig.shape[1] * 9
    expected_std = 0.02 * math.sqrt(2.0 / (fan + fan))
    assert conv.weight_orig.std().item() == pytest.approx(expected_std, rel=0.05)
    assert (conv.bias == 0).all()
    # ToMask and the SFM keep PyTorch's default init (kaiming-uniform, a=sqrt(5): bound 1/sqrt(fan_in));
    # model.sfm_init=zero zeroes F1's and F2's last convs, =xavier gives them SPADE's (models/sfm.py).
    for conv in (g.sfms[0].f1[0], g.sfms[-1].f2[2], g.to_masks[0].conv):
        bound = 1 / math.sqrt(conv.weight.shape[1] * 9)
        assert conv.weight.abs().max().item() <= bound and conv.weight.std().item() > 0.4 * bound
        assert (conv.bias != 0).all()
    zero = build_generator(tiny(64, sfm_init="zero"))
    assert all((s.f1[-1].weight == 0).all() and (s.f2[-1].bias == 0).all() for s in zero.sfms)
    assert (zero.sfms[0].f1[0].weight != 0).all()
    xavier = build_generator(tiny(64, sfm_init="xavier"))
    assert all((s.f1[0].bias == 0).all() and s.f1[0].weight.std() < 0.01 for s in xavier.sfms)
    d = build_discriminator(tiny(64))
    assert (d.discriminator_0.model0[0].bias == 0).all()
    assert g.grad_checkpoint is False


# ---------------------------------------------- parameter counts: SPADE in closed form


def conv(k: int, cin: int, cout: int, bias: bool = True) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def spade_norm(norm_nc: int, label_nc: int, hidden: int) -> int:
    return conv(3, label_nc, hidden) + 2 * conv(3, hidden, norm_nc)


def spade_block(fin: int, fout: int, label_nc: int, hidden: int) -> int:
    fmid = min(fin, fout)
    n = conv(3, fin, fmid) + conv(3, fmid, fout)
    n += spade_norm(fin, label_nc, hidden) + spade_norm(fmid, label_nc, hidden)
    if fin != fout:
        n += conv(1, fin, fout, bias=False) + spade_norm(fin, label_nc, hidden)
    return n


def block_widths(nf: int, num_upsampling: str) -> list[tuple[int, int]]:
    widths = [(16 * nf, 16 * nf)] * 3 + [(16 * nf, 8 * nf), (8 * nf, 4 * nf), (4 * nf, 2 * nf), (2 * nf, nf)]
    return widths + ([(nf, nf // 2)] if num_upsampling == "most" else [])


def spade_generator_params(cfg: ModelConfig) -> int:
    nf, c, ups = cfg.ngf, cfg.num_classes, {"normal": 5, "more": 6, "most": 7}[cfg.num_upsampling]
    s = cfg.image_size // 2**ups
    fc = cfg.z_dim * 16 * nf * s * s + 16 * nf * s * s if cfg.use_z else conv(3, c, 16 * nf)
    widths = block_widths(nf, cfg.num_upsampling)
    blocks = sum(spade_block(fin, fout, c, cfg.spade_hidden) for fin, fout in widths)
    return fc + blocks + conv(3, widths[-1][1], 3)


def sfm_extra_params(cfg: ModelConfig) -> int:
    c, h = cfg.num_classes, cfg.sfm_hidden
    per_sfm = conv(3, 2 * c, h) + conv(3, h, c) + conv(3, c, h) + conv(3, h, c)
    return sum(conv(3, fout, c) + per_sfm for _, fout in block_widths(cfg.ngf, cfg.num_upsampling)[:-1])


def spade_discriminator_params(cfg: ModelConfig) -> int:
    nf, n = cfg.ndf, conv(4, cfg.num_classes + 3, cfg.ndf)
    for _ in range(1, cfg.d_layers):
        nf_prev, nf = nf, min(2 * nf, 512)
        n += conv(4, nf_prev, nf, bias=False)
    return cfg.d_scales * (n + conv(4, nf, 1))


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# SPADE's default (no VAE) at 256x256, ngf 64, 'normal', spectral norm; built on the meta
# device: the shapes are real, no memory is spent on 92M weights.
SPADE_256 = ModelConfig(num_classes=C, image_size=256, ngf=64, ndf=64, use_z=False, sfm=False,
                        spectral_norm=True, num_upsampling="normal")


def test_generator_params_equal_spade_closed_form() -> None:
    with torch.device("meta"):
        g = build_generator(SPADE_256)
    assert n_params(g) == spade_generator_params(SPADE_256)
    assert not [k for k, _ in g.named_parameters() if k.startswith(("to_masks", "sfms"))]


def test_discriminator_params_equal_spade_closed_form() -> None:
    with torch.device("meta"):
        d = build_discriminator(SPADE_256)
    assert n_params(d) == spade_discriminator_params(SPADE_256)


def test_sfm_adds_only_tomask_and_sfm_params() -> None:
    with torch.device("meta"):
        base = dict(build_generator(SPADE_256).named_parameters())
        with_sfm = dict(build_generator(ModelConfig(**{**vars(SPADE_256), "sfm": True})).named_parameters())
    extra = {k: v for k, v in with_sfm.items() if k not in base}
    assert all(k.startswith(("to_masks.", "sfms.")) for k in extra)
    assert all(with_sfm[k].shape == v.shape for k, v in base.items())
    assert sum(v.numel() for v in extra.values()) == sfm_extra_params(SPADE_256)


@pytest.mark.parametrize("num_upsampling", ["normal", "more", "most"])
@pytest.mark.parametrize("use_z", [True, False])
def test_params_closed_form_across_variants(num_upsampling: str, use_z: bool) -> None:
    cfg = tiny(128, num_upsampling=num_upsampling, use_z=use_z, sfm=True, d_layers=5, ndf=64)
    with torch.device("meta"):
        g, d = build_generator(cfg), build_discriminator(cfg)
    assert n_params(g) == spade_generator_params(cfg) + sfm_extra_params(cfg)
    assert n_params(d) == spade_discriminator_params(cfg)  # ndf 64, 5 layers: 512 cap reached


@pytest.mark.parametrize("sfm", [True, False])
def test_every_parameter_gets_a_gradient(sfm: bool) -> None:
    """DDP (without find_unused_parameters) needs every parameter in the graph."""
    cfg = tiny(64, sfm=sfm)
    g, d = build_generator(cfg), build_discriminator(cfg)
    m0 = random_onehot(2, 64)
    image, masks = g(m0, return_masks=True)
    sum(f.mean() for scale in d(m0, image) for f in scale).backward()
    assert all(p.grad is not None for p in [*g.parameters(), *d.parameters()])


def test_recomputed_block_matches_plain_block_and_keeps_buffers():
    """A recomputed SPADE block gives the plain block's output, gradients, BatchNorm statistics
    and spectral-norm vectors; torch's bare checkpoint would update the buffers twice."""
    import copy

    from torch.utils.checkpoint import checkpoint

    from ssgan_dist.models.recompute import recomputed
    from ssgan_dist.models.spade import SPADEResBlock

    torch.manual_seed(0)
    block = SPADEResBlock(8, 4, 5, hidden=8, use_spectral_norm=True)
    twin, naive = copy.deepcopy(block), copy.deepcopy(block)
    x = torch.randn(3, 8, 6, 6)
    seg = torch.rand(3, 5, 6, 6)
    outs = [block(x, seg), recomputed(twin, x, seg), checkpoint(naive, x, seg, use_reentrant=False)]
    for out in outs:
        out.square().mean().backward()
    assert torch.equal(outs[0], outs[1])
    for (name, a), b in zip(block.named_parameters(), twin.parameters()):  # relative: no CPU's noise floor
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * float(a.grad.abs().max()), msg=name)
    for (name, a), b in zip(block.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), name
    stats = [n for n, _ in block.named_buffers() if "running_mean" in n]
    assert any(not torch.equal(dict(block.named_buffers())[n], dict(naive.named_buffers())[n]) for n in stats)
