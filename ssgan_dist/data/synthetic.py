"""Synthetic scenes in SketchyCOCO's shape, so training, tests and benchmarks run anywhere.

A scene is laid out as an instance map (sky, a wavy horizon with ground below, cloud and
tree blobs, then 1-3 foreground objects painted far to near), rendered to a photo-like
image (class colour, smooth shading, low-frequency texture, per-object lighting, ground
shadows), and traced to a sketch: strokes on every instance boundary, 2 px where the
pencil "presses", else 1 px on the nearer region's side. The label is the class of each
stroke pixel, as in SketchyCOCO's semantic sketches. Everything is a pure function of
the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ssgan_dist.data.schema import label_classes
from ssgan_dist.labels import BACKGROUND_CLASSES, PALETTE

# Background roles and the SketchyCOCO class each prefers; a role whose class is not among
# the background classes takes the next unused one, or is left out (sky/ground: class 0).
ROLE_PREFERENCE = (("sky", 18), ("ground", 17), ("cloud", 16), ("tree", 19))
# SketchyCOCO's vehicles and animals get their kind of silhouette; other classes c: [c % 4].
_KIND = {**dict.fromkeys((1, 2, 3, 4), "vehicle"), 5: "polygon", 6: "polygon", **dict.fromkeys(range(7, 16), "animal")}
OBJECT_SHAPES = ("ellipse", "vehicle", "polygon", "animal")

# Photo-like base colours; classes past SketchyCOCO's use their palette colour.
_COLOURS = {
    0: (150, 140, 120), 1: (60, 60, 70), 2: (175, 35, 35), 3: (35, 40, 70), 4: (205, 205, 215),
    5: (50, 50, 45), 6: (200, 45, 30), 7: (150, 110, 70), 8: (175, 135, 85), 9: (110, 70, 40),
    10: (225, 220, 205), 11: (70, 55, 45), 12: (125, 120, 115), 13: (95, 65, 40),
    14: (215, 215, 210), 15: (210, 160, 80), 16: (236, 238, 245), 17: (85, 145, 60),
    18: (105, 155, 225), 19: (40, 95, 45),
}
# Amplitudes of the coarse and the fine texture per role (grass and leaves are rough).
_TEXTURE = {"sky": (0.05, 0.01), "cloud": (0.08, 0.02), "ground": (0.10, 0.14),
            "tree": (0.12, 0.18), "object": (0.07, 0.04)}


@dataclass
class Scene:
    """One scene; ``class_map`` is every pixel's class (the label keeps only stroke pixels)."""

    sketch: np.ndarray  # uint8 [S,S], 255 = paper
    label: np.ndarray  # uint8 [S,S], class on stroke pixels, 0 elsewhere
    image: np.ndarray  # uint8 [S,S,3]
    class_map: np.ndarray  # uint8 [S,S]
    meta: dict[str, Any]


@dataclass
class _Region:
    kind: str  # a role of ROLE_PREFERENCE or "object"
    cls: int
    centre: tuple[float, float] = (0.0, 0.0)  # objects only: for lighting and shadow
    radius: float = 1.0


def _roles(background: list[int]) -> dict[str, int]:
    free, roles = list(background), {}
    for role, preferred in ROLE_PREFERENCE:
        if free:
            roles[role] = preferred if preferred in free else free[0]
            free.remove(roles[role])
    return roles


def _ellipse(cx: float, cy: float, a: float, b: float, angle: float = 0.0, n: int = 32) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def _rect(cx: float, cy: float, w: float, h: float, angle: float = 0.0) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in corners]


def _object_polygons(rng: np.random.Generator, cls: int, cx: float, cy: float, r: float) -> list[list]:
    """Polygons whose union is one object; (cx, cy) is the centre, r the half-width.
    Proportions come from a generator seeded by the class, so each class keeps its own
    silhouette (a long-legged, long-necked animal stays one) and instances only jitter."""
    kind = _KIND.get(cls, OBJECT_SHAPES[cls % len(OBJECT_SHAPES)])
    own = np.random.default_rng(cls)
    p = own.uniform(0, 1, 5) * rng.uniform(0.9, 1.1, 5)
    tilt = rng.uniform(-0.25, 0.25)
    if kind == "ellipse":
        return [_ellipse(cx, cy, r, r * (0.5 + 0.4 * p[0]), tilt)]
    if kind == "polygon":
        n = int(own.integers(5, 9))
        t = np.sort(own.uniform(0, 2 * np.pi, n)) + tilt
        rad = r * own.uniform(0.6, 1.0, n)
        return [list(zip(cx + rad * np.cos(t), cy + rad * np.sin(t)))]
    side = rng.choice([-1.0, 1.0])  # which way it faces
    if kind == "vehicle":
        h, wheel = (0.4 + 0.4 * p[0]) * r, (0.2 + 0.15 * p[3]) * r
        cabin = _rect(cx - side * 0.15 * r, cy - h / 2 - (0.15 + 0.2 * p[2]) * r, (0.6 + 0.6 * p[1]) * r, (0.3 + 0.4 * p[2]) * r)
        wheels = [_ellipse(cx + dx * r, cy + h / 2, wheel, wheel) for dx in (-0.6, 0.6)]
        return [_rect(cx, cy, 2 * r, h), cabin, *wheels]
    body_h, leg, head, neck, leg_w = 0.4 + 0.3 * p[0], 0.5 + 0.7 * p[1], 0.22 + 0.15 * p[2], 0.9 * p[3], 0.1 + 0.08 * p[4]
    legs = [_rect(cx + dx * r, cy + (body_h * 0.4 + leg / 2) * r, leg_w * r, leg * r) for dx in (-0.7, -0.45, 0.45, 0.7)]
    hx, hy = cx + side * (0.9 + 0.2 * p[3]) * r, cy - (0.35 + neck) * r
    neck_poly = [(cx + side * 0.55 * r, cy - 0.1 * r), (cx + side * 0.8 * r, cy - 0.25 * r), (hx, hy), (hx - side * 0.15 * r, hy + 0.1 * r)]
    return [_ellipse(cx, cy, r, body_h * r, tilt * 0.3), _ellipse(hx, hy, head * r, 0.8 * head * r), neck_poly, *legs]


def _mask(size: int, polygons: list[list]) -> np.ndarray:
    img = Image.new("1", (size, size))
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon(poly, fill=1)
    return np.asarray(img)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean noise with features about size/cells pixels wide (bicubic upsampling)."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))


def _layout(rng: np.random.Generator, size: int, foreground: list[int], roles: dict[str, int]):
    """Instance map (int32 [S,S], painter's order) and the region of each instance."""
    s = float(size)
    xs = np.arange(size)
    horizon = np.full(size, rng.uniform(0.3, 0.6) * s)
    for _ in range(3):
        horizon += rng.uniform(0, 0.03) * s * np.sin(2 * np.pi * rng.uniform(0.5, 4) * xs / s + rng.uniform(0, 2 * np.pi))
    regions = [_Region("sky", roles.get("sky", 0)), _Region("ground", roles.get("ground", 0))]
    inst = (np.arange(size)[:, None] > horizon[None, :]).astype(np.int32)
    ground = inst == 1

    def paint(region: _Region, mask: np.ndarray) -> None:
        inst[mask] = len(regions)
        regions.append(region)

    h_mean = float(horizon.mean())
    if "cloud" in roles:
        for _ in range(rng.integers(0, 4)):
            cx, cy, w = rng.uniform(0, s), rng.uniform(0.05, 0.8) * h_mean, rng.uniform(0.05, 0.12) * s
            blobs = [_ellipse(cx + dx * w, cy + rng.uniform(-0.3, 0.1) * w, w * rng.uniform(0.5, 0.9), w * rng.uniform(0.35, 0.6))
                     for dx in np.linspace(-1, 1, int(rng.integers(3, 6)))]
            paint(_Region("cloud", roles["cloud"]), _mask(size, blobs) & ~ground)
    if "tree" in roles:
        for _ in range(rng.integers(0, 3)):
            x = rng.uniform(0, s)
            base, crown = horizon[int(x) % size] + rng.uniform(0, 0.05) * s, rng.uniform(0.06, 0.13) * s
            parts = [_rect(x, base - 0.6 * crown, 0.3 * crown, 1.2 * crown)]
            parts += [_ellipse(x + rng.uniform(-0.5, 0.5) * crown, base - crown * rng.uniform(1.6, 2.2),
                               crown * rng.uniform(0.6, 1.0), crown * rng.uniform(0.6, 0.9)) for _ in range(3)]
            paint(_Region("tree", roles["tree"]), _mask(size, parts))
    if foreground:
        objects = []
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.choice(foreground))
            r = max(rng.uniform(0.1, 0.22) * s, 3.0)
            bottom = rng.uniform(max(h_mean + 0.05 * s, 0.45 * s), 0.95 * s)
            objects.append((bottom, cls, rng.uniform(0.1, 0.9) * s, bottom - 0.7 * r, r))
        for _, cls, cx, cy, r in sorted(objects):  # far (higher up) first, near ones occlude
            polys = _object_polygons(rng, cls, cx, cy, r)
            paint(_Region("object", cls, (cx, cy), r), _mask(size, polys))
    return inst, regions


def _render(rng: np.random.Generator, size: int, inst: np.ndarray, regions: list[_Region]) -> np.ndarray:
    s = float(size)
    n = len(regions)
    colour = np.array([_COLOURS.get(r.cls, tuple(PALETTE[r.cls])) for r in regions], np.float32)
    colour = colour * rng.uniform(0.85, 1.1, (n, 1)) + rng.normal(0, 8, (n, 3))
    grad = rng.normal(0, 0.15, (n, 2))
    for i, r in enumerate(regions):
        if r.kind == "sky":
            grad[i] = (0.0, rng.uniform(0.2, 0.4))  # lighter towards the horizon haze
    tex = np.array([_TEXTURE[r.kind] for r in regions], np.float32)
    is_obj = np.array([r.kind == "object" for r in regions])
    centre = np.array([r.centre for r in regions], np.float32) / s
    radius = np.array([r.radius for r in regions], np.float32) / s
    light = np.array([rng.uniform(-0.8, 0.8), -1.0])  # from above, left or right
    light /= np.hypot(*light)

    y = ((np.arange(size, dtype=np.float32) + 0.5) / s)[:, None]
    x = ((np.arange(size, dtype=np.float32) + 0.5) / s)[None, :]
    dx, dy = x - centre[inst, 0], y - centre[inst, 1]
    lit = np.clip((dx * light[0] + dy * light[1]) / radius[inst], -1, 1) * 0.25 * is_obj[inst]
    coarse = _smooth_noise(rng, size, 6)
    fine = _smooth_noise(rng, size, max(size // 4, 2))
    lum = (1.0 + grad[inst, 0] * (x - 0.5) + grad[inst, 1] * (y - 0.5) + lit
           + tex[inst, 0] * coarse + tex[inst, 1] * fine)

    shadow = Image.new("L", (size, size))
    draw = ImageDraw.Draw(shadow)
    for r in regions:
        if r.kind == "object":
            cx, cy = r.centre
            draw.polygon(_ellipse(cx - light[0] * 0.3 * r.radius, cy + 0.75 * r.radius, 1.1 * r.radius, 0.2 * r.radius), fill=90)
    shadow = np.asarray(shadow.filter(ImageFilter.GaussianBlur(max(size / 100, 1.0))), np.float32)
    lum *= 1.0 - (shadow / 255.0) * ~is_obj[inst]

    img = colour[inst] * lum[..., None] + rng.normal(0, 2.0, (size, size, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.array(img.filter(ImageFilter.GaussianBlur(0.6)))  # a lens, not a pixel grid


def _sketch(rng: np.random.Generator, size: int, inst: np.ndarray, class_map: np.ndarray):
    """Strokes on instance boundaries: always the nearer side, both sides where pressed."""
    both = np.zeros((size, size), bool)
    front = np.zeros((size, size), bool)
    for axis in (0, 1):
        a, b = (inst[:-1], inst[1:]) if axis == 0 else (inst[:, :-1], inst[:, 1:])
        edge = a != b
        first, second = (np.s_[:-1], np.s_[1:]) if axis == 0 else (np.s_[:, :-1], np.s_[:, 1:])
        both[first] |= edge
        both[second] |= edge
        front[first] |= edge & (a > b)
        front[second] |= edge & (b > a)
    pressed = _smooth_noise(rng, size, max(size // 16, 2)) > -0.2
    stroke = front | (both & pressed)
    ink = 45 + 25 * _smooth_noise(rng, size, max(size // 8, 2)) + rng.normal(0, 8, (size, size))
    sketch = np.where(stroke, np.clip(ink, 0, 100), 255).astype(np.uint8)
    label = np.where(stroke, class_map, 0).astype(np.uint8)
    return sketch, label


def generate(seed: int, size: int, num_classes: int = 20,
             background_classes: Sequence[int] = BACKGROUND_CLASSES) -> Scene:
    """The full scene for ``seed``, class map included (for tests and dense-mask uses)."""
    if size < 16:
        raise ValueError(f"synthetic scenes need size >= 16, got {size}")
    if not 2 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 2..256 (8-bit labels), got {num_classes}")
    rng = np.random.default_rng(seed)
    background = [c for c in background_classes if 0 < c < num_classes]
    foreground = [c for c in range(1, num_classes) if c not in background]
    inst, regions = _layout(rng, size, foreground, _roles(background))
    visible = np.bincount(inst.ravel(), minlength=len(regions)) > 0
    class_map = np.array([r.cls for r in regions], np.uint8)[inst]
    image = _render(rng, size, inst, regions)
    sketch, label = _sketch(rng, size, inst, class_map)
    meta = {
        "source_id": f"synthetic-{seed}", "split": "train", "seed": int(seed), "size": [size, size],
        "classes": label_classes(label),
        "regions": [{"kind": r.kind, "class": r.cls} for r, v in zip(regions, visible) if v],
    }
    return Scene(sketch, label, image, class_map, meta)


def make_scene(seed: int, size: int, num_classes: int = 20,
               background_classes: Sequence[int] = BACKGROUND_CLASSES):
    """(sketch uint8 [S,S], label uint8 [S,S], image uint8 [S,S,3], meta dict) for ``seed``."""
    scene = generate(seed, size, num_classes, background_classes)
    return scene.sketch, scene.label, scene.image, scene.meta
