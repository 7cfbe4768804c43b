"""The testbed's seven procedural image domains: how each class of each domain is drawn.

Why a module of its own: the pixel-level drawing (signed distances, rotations, palettes, noise) is
the bulk of the testbed's data code, and it is independent of which domains exist and how a split
is drawn from them (`tatr.suites.testbed.data`). Every function is vectorised over samples and a
pure function of the `torch.Generator` state, so a split's bytes depend only on its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SIZE = 16
Render = Callable[[Tensor, torch.Generator, bool], Tensor]

_lin = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE * 2 - 1
YY, XX = torch.meshgrid(_lin, _lin, indexing="ij")  # [S, S] in [-1, 1], y grows downwards


def _u(gen: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    """n uniform draws in [lo, hi), shaped [n, 1, 1] to broadcast over the pixel grid."""
    return (lo + (hi - lo) * torch.rand(n, generator=gen)).view(n, 1, 1)


def colour(gen: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """n random RGB colours with channels in [lo, hi), shaped [n, 3, 1, 1]."""
    return (lo + (hi - lo) * torch.rand(n, 3, generator=gen)).view(n, 3, 1, 1)


def fill(mask: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
    """Blend colours [n,3,1,1] (or images [n,3,S,S]) with a soft mask [n,S,S]."""
    m = mask.unsqueeze(1)
    return m * fg + (1 - m) * bg


def _soft(sdf: Tensor, sharp: float = 12.0) -> Tensor:
    """Soft inside-mask from a signed distance (positive inside): anti-aliased edges."""
    return torch.sigmoid(sharp * sdf)


def _rotate(x: Tensor, y: Tensor, angle: Tensor) -> tuple[Tensor, Tensor]:
    c, s = torch.cos(angle), torch.sin(angle)
    return c * x + s * y, -s * x + c * y


def finish(img: Tensor, gen: torch.Generator, clean: bool, noise: float = 0.06) -> Tensor:
    """Add pixel noise and a random brightness/contrast change unless rendering an icon."""
    if not clean:
        n = img.shape[0]
        contrast = _u(gen, n, 0.7, 1.2).unsqueeze(1)
        bright = _u(gen, n, -0.12, 0.12).unsqueeze(1)
        img = (img - 0.5) * contrast + 0.5 + bright
        img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp(0, 1)


def _contrasting(gen: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """A random foreground colour and a background colour guaranteed to differ in brightness."""
    fg = colour(gen, n)
    bg = colour(gen, n)
    lum = lambda c: c.mean(1, keepdim=True)  # noqa: E731
    flip = (lum(fg) - lum(bg)).abs() < 0.3
    bg = torch.where(flip, 1 - fg, bg)
    return fg, bg


# --- shapes -----------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond", "plus", "ring", "ellipse", "crescent")


def _shape_sdf(label: Tensor, x: Tensor, y: Tensor, r: Tensor) -> Tensor:
    d = torch.sqrt(x**2 + y**2)
    sdfs = torch.stack(
        [
            r - d,
            r * 0.85 - torch.maximum(x.abs(), y.abs()),
            torch.minimum(r * 0.6 - y, (y + r) * 0.6 - x.abs()),
            r * 1.1 - (x.abs() + y.abs()),
            torch.maximum(
                torch.minimum(r - x.abs(), r * 0.33 - y.abs()), torch.minimum(r * 0.33 - x.abs(), r - y.abs())
            ),
            r * 0.3 - (d - r * 0.75).abs(),
            1.0 - torch.sqrt((x / (r * 1.2)) ** 2 + (y / (r * 0.55)) ** 2),
            torch.minimum(r - d, torch.sqrt((x - r * 0.55) ** 2 + y**2) - r * 0.8),
        ]
    )  # [8, n, S, S]
    return sdfs.gather(0, label.view(1, -1, 1, 1).expand(1, *sdfs.shape[1:])).squeeze(0)


def shapes(label: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    n = len(label)
    if clean:
        cx = cy = torch.zeros(n, 1, 1)
        r = torch.full((n, 1, 1), 0.6)
        angle = torch.zeros(n, 1, 1)
        fg, bg = torch.ones(n, 3, 1, 1), torch.zeros(n, 3, 1, 1)
    else:
        cx, cy = _u(gen, n, -0.25, 0.25), _u(gen, n, -0.25, 0.25)
        r = _u(gen, n, 0.42, 0.62)
        angle = _u(gen, n, -0.3, 0.3)
        fg, bg = _contrasting(gen, n)
    x, y = _rotate(XX - cx, YY - cy, angle)
    return finish(fill(_soft(_shape_sdf(label, x, y, r)), fg, bg), gen, clean)


# --- textures ---------------------------------------------------------------------------------
TEXTURES = ("stripes", "checker", "dots", "crosshatch", "zigzag", "rings", "speckle", "blotches")


def textures(label: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    n = len(label)
    if clean:
        angle, freq, phase = torch.zeros(n, 1, 1), torch.full((n, 1, 1), 3.0), torch.zeros(n, 1, 1)
        fg, bg = torch.ones(n, 3, 1, 1), torch.zeros(n, 3, 1, 1)
    else:
        angle = _u(gen, n, 0, math.pi)
        freq = _u(gen, n, 2.2, 3.8)
        phase = _u(gen, n, 0, 2 * math.pi)
        fg, bg = _contrasting(gen, n)
    x, y = _rotate(XX, YY, angle)
    w = freq * math.pi
    speckle = torch.rand(n, SIZE, SIZE, generator=gen)
    coarse = torch.rand(n, 1, 4, 4, generator=gen)
    blot = torch.nn.functional.interpolate(coarse, size=SIZE, mode="bicubic", align_corners=False).squeeze(1)
    pats = torch.stack(
        [
            torch.sin(w * x + phase),
            torch.sin(w * x + phase) * torch.sin(w * y + phase),
            torch.cos(w * x + phase) * torch.cos(w * y) - 0.5,
            torch.maximum(torch.sin(w * x + phase), torch.sin(w * y + phase)) - 0.7,
            torch.sin(w * y + 1.5 * torch.sin(w * x) + phase),
            torch.sin(1.6 * w * torch.sqrt(x**2 + y**2) + phase),
            (speckle - 0.5) * 3,
            (blot - 0.5) * 6,
        ]
    )
    pat = pats.gather(0, label.view(1, -1, 1, 1).expand(1, *pats.shape[1:])).squeeze(0)
    return finish(fill(_soft(pat, 4.0), fg, bg), gen, clean)


# --- counts -----------------------------------------------------------------------------------
COUNTS = ("one", "two", "three", "four", "five", "six")
_DICE = [
    [(0, 0)],
    [(-0.45, -0.45), (0.45, 0.45)],
    [(-0.5, -0.5), (0, 0), (0.5, 0.5)],
    [(-0.45, -0.45), (-0.45, 0.45), (0.45, -0.45), (0.45, 0.45)],
    [(-0.5, -0.5), (-0.5, 0.5), (0, 0), (0.5, -0.5), (0.5, 0.5)],
    [(-0.5, -0.5), (-0.5, 0), (-0.5, 0.5), (0.5, -0.5), (0.5, 0), (0.5, 0.5)],
]


def counts(label: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    """k blobs (k = label + 1) on a background; positions on a jittered 3×3 lattice so they never merge."""
    n = len(label)
    k = label + 1
    if clean:
        pos = torch.zeros(n, 6, 2)
        for i, kk in enumerate(k.tolist()):
            pos[i, :kk] = torch.tensor(_DICE[kk - 1])
        radius = torch.full((n, 6), 0.22)
        fg, bg = torch.ones(n, 3, 1, 1), torch.zeros(n, 3, 1, 1)
    else:
        cells = torch.argsort(torch.rand(n, 9, generator=gen), dim=1)[:, :6]
        lattice = torch.tensor([(r, c) for r in (-0.6, 0, 0.6) for c in (-0.6, 0, 0.6)])
        pos = lattice[cells] + 0.12 * (torch.rand(n, 6, 2, generator=gen) - 0.5)
        radius = 0.14 + 0.1 * torch.rand(n, 6, generator=gen)
        fg, bg = _contrasting(gen, n)
    present = torch.arange(6).view(1, 6) < k.view(n, 1)  # [n, 6]
    d = torch.sqrt((YY - pos[:, :, 0, None, None]) ** 2 + (XX - pos[:, :, 1, None, None]) ** 2)
    sdf = (radius[:, :, None, None] - d).masked_fill(~present[:, :, None, None], -1.0)
    return finish(fill(_soft(sdf.max(1).values, 14.0), fg, bg), gen, clean)


# --- signs ------------------------------------------------------------------------------------
SIGNS = ("stop", "no_entry", "warning", "yield", "keep_left", "keep_right", "ahead_only", "priority")
_RED, _WHITE, _BLUE = (0.85, 0.1, 0.1), (0.95, 0.95, 0.95), (0.1, 0.25, 0.8)
_YELLOW, _BLACK = (0.95, 0.8, 0.1), (0.05, 0.05, 0.05)


def signs(label: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    n = len(label)
    if clean:
        cx = cy = torch.zeros(n, 1, 1)
        r = torch.full((n, 1, 1), 0.8)
        bg = torch.full((n, 3, 1, 1), 0.5)
    else:
        cx, cy = _u(gen, n, -0.25, 0.25), _u(gen, n, -0.25, 0.25)
        r = _u(gen, n, 0.55, 0.85)
        bg = colour(gen, n, 0.2, 0.8)
    x, y = (XX - cx) / r, (YY - cy) / r  # unit-size sign coordinates
    d = torch.sqrt(x**2 + y**2)
    circle = _soft(1 - d, 10 * r.squeeze(-1).squeeze(-1).view(n, 1, 1))
    tri_up = _soft(torch.minimum(0.75 - y, (y + 0.95) * 0.55 - x.abs()))
    tri_down = _soft(torch.minimum(y + 0.75, (0.95 - y) * 0.55 - x.abs()))
    diamond = _soft(0.95 - (x.abs() + y.abs()))
    octagon = _soft(0.92 - torch.maximum(torch.maximum(x.abs(), y.abs()), (x.abs() + y.abs()) / 1.35))
    bar = _soft(torch.minimum(0.6 - x.abs(), 0.18 - y.abs()))
    vbar = _soft(torch.minimum(0.18 - x.abs(), 0.6 - y.abs()))
    mark = _soft(torch.minimum(0.1 - x.abs(), 0.3 - (y - 0.05).abs()))
    inner_up = _soft(torch.minimum(0.45 - y, (y + 0.6) * 0.45 - x.abs()))
    inner_down = _soft(torch.minimum(y + 0.45, (0.6 - y) * 0.45 - x.abs()))
    small_diamond = _soft(0.5 - (x.abs() + y.abs()))

    def arrow(ax: Tensor, ay: Tensor) -> Tensor:  # pointing towards +ax
        shaft = torch.minimum(0.12 - ay.abs(), torch.minimum(ax + 0.55, 0.1 - ax))
        head = torch.minimum(ax + 0.05, (0.6 - ax) * 0.9 - ay.abs())
        return _soft(torch.maximum(shaft, head))

    def c(rgb: tuple[float, float, float]) -> Tensor:
        return torch.tensor(rgb).view(1, 3, 1, 1)

    img = bg.expand(n, 3, SIZE, SIZE).clone()
    layers = {
        0: [(octagon, _RED), (vbar * octagon, _WHITE)],
        1: [(circle, _RED), (bar * circle, _WHITE)],
        2: [(tri_up, _RED), (inner_up, _WHITE), (mark * inner_up, _BLACK)],
        3: [(tri_down, _RED), (inner_down, _WHITE)],
        4: [(circle, _BLUE), (arrow(-x, y) * circle, _WHITE)],
        5: [(circle, _BLUE), (arrow(x, y) * circle, _WHITE)],
        6: [(circle, _BLUE), (arrow(-y, x) * circle, _WHITE)],
        7: [(diamond, _WHITE), (small_diamond, _YELLOW)],
    }
    for cls, stack in layers.items():
        sel = label == cls
        if not sel.any():
            continue
        part = img[sel]
        for mask, rgb in stack:
            part = fill(mask[sel], c(rgb), part)
        img[sel] = part
    if not clean:
        img = img + 0.3 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    return finish(img, gen, clean)


# --- satellite --------------------------------------------------------------------------------
SATELLITE = ("water", "forest", "crops", "urban", "river", "highway", "desert", "pasture")


def satellite(label: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    n = len(label)
    jitter = torch.zeros(n, 3, 1, 1) if clean else 0.3 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    angle = torch.zeros(n, 1, 1) if clean else _u(gen, n, 0, math.pi)
    offset = torch.zeros(n, 1, 1) if clean else _u(gen, n, -0.4, 0.4)
    x, y = _rotate(XX, YY, angle)
    fine = torch.rand(n, 1, SIZE, SIZE, generator=gen)
    coarse = torch.nn.functional.interpolate(
        torch.rand(n, 1, 4, 4, generator=gen), size=SIZE, mode="bicubic", align_corners=False
    )
    tex = (0.0 if clean else 1.0) * (0.5 * fine + 0.5 * coarse - 0.5)

    def col(*rgb: float) -> Tensor:
        return torch.tensor(rgb).view(1, 3, 1, 1)

    water = col(0.1, 0.25, 0.55) + 0.1 * tex
    forest = col(0.1, 0.35, 0.12) + 0.35 * (fine - 0.5) * (0 if clean else 1) + 0.1 * tex
    green = col(0.35, 0.55, 0.2) + 0.15 * tex
    crops = fill((torch.sin(9 * x) > 0).float(), col(0.75, 0.7, 0.3), col(0.3, 0.55, 0.2)) + 0.1 * tex
    blocks = ((torch.sin(10 * x) > -0.3) & (torch.sin(10 * y) > -0.3)).float()
    urban = fill(blocks, col(0.6, 0.6, 0.62), col(0.3, 0.3, 0.32)) + 0.15 * tex
    river = fill(_soft(0.18 - (y - offset - 0.25 * torch.sin(3 * x)).abs(), 15), col(0.1, 0.3, 0.6), green)
    highway = fill(_soft(0.12 - (y - offset).abs(), 15), col(0.55, 0.55, 0.55), col(0.45, 0.5, 0.25) + 0.15 * tex)
    desert = col(0.8, 0.68, 0.45) + 0.1 * torch.sin(6 * x + 3 * coarse.squeeze(1)).unsqueeze(1) + 0.05 * tex
    pasture = col(0.5, 0.72, 0.35) + 0.08 * tex
    pats = torch.stack([water, forest, crops, urban, river, highway, desert, pasture])  # [8, n, 3, S, S]
    img = pats.gather(0, label.view(1, -1, 1, 1, 1).expand(1, *pats.shape[1:])).squeeze(0)
    return finish(img + jitter, gen, clean)


# --- scenes -----------------------------------------------------------------------------------
SCENES = ("beach", "forest", "desert", "snowfield", "city", "night", "sunset", "indoor")


def scenes(label: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    n = len(label)
    horizon = torch.zeros(n, 1, 1) if clean else _u(gen, n, -0.35, 0.35)
    jitter = torch.zeros(n, 3, 1, 1) if clean else 0.35 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    shift = torch.zeros(n, 1, 1) if clean else _u(gen, n, 0, 2 * math.pi)
    ground = _soft(YY - horizon, 20)  # 1 below the horizon
    stars = (torch.rand(n, SIZE, SIZE, generator=gen) > (1.0 if clean else 0.93)).float()
    if clean:
        stars = ((XX * 7).round() % 3 == 0).float() * ((YY * 7).round() % 3 == 0).float() * (YY < 0).float()
        stars = stars.expand(n, SIZE, SIZE)

    def col(*rgb: float) -> Tensor:
        return torch.tensor(rgb).view(1, 3, 1, 1)

    sky = col(0.5, 0.7, 0.95)
    beach = fill(ground, fill(_soft(YY - horizon - 0.45, 20), col(0.9, 0.8, 0.55), col(0.1, 0.35, 0.7)), sky)
    trees = _soft(YY - (horizon - 0.25 - 0.25 * torch.sin(7 * XX + shift)), 12)
    forest = fill(trees, col(0.1, 0.35, 0.12), sky)
    desert = fill(ground, col(0.85, 0.7, 0.45), col(0.65, 0.8, 0.95))
    snow = fill(ground, col(0.95, 0.95, 0.97), col(0.7, 0.72, 0.78))
    heights = 0.35 * torch.sin(5 * XX + shift).sign() * 0.5 + 0.1 * torch.sin(11 * XX + 2 * shift)
    city = fill(_soft(YY - horizon + 0.3 + heights, 20), col(0.35, 0.35, 0.4), col(0.75, 0.8, 0.9))
    night = fill(ground, col(0.05, 0.05, 0.08), col(0.03, 0.03, 0.15) + 0.9 * stars.unsqueeze(1))
    grad = ((YY + 1) / 2).view(1, 1, SIZE, SIZE)
    sunset = fill(ground, col(0.12, 0.08, 0.12), col(0.95, 0.55, 0.15) * grad + col(0.4, 0.2, 0.5) * (1 - grad))
    window = _soft(torch.minimum(0.3 - (XX - 0.2 * torch.sin(shift)).abs(), 0.25 - (YY - horizon + 0.45).abs()), 20)
    indoor = fill(ground, col(0.45, 0.3, 0.18), fill(window, col(0.6, 0.8, 1.0), col(0.85, 0.8, 0.7)))
    pats = torch.stack([beach, forest, desert, snow, city, night, sunset, indoor])
    img = pats.gather(0, label.view(1, -1, 1, 1, 1).expand(1, *pats.shape[1:])).squeeze(0)
    return finish(img + jitter, gen, clean)


# --- flags ------------------------------------------------------------------------------------
FLAGS = ("rwb_h", "bwr_h", "rwb_v", "gwr_v", "kry_h", "kyr_v", "wbw_h", "ryg_v")
_PALETTE = {
    "r": (0.85, 0.1, 0.1),
    "w": (0.95, 0.95, 0.95),
    "b": (0.1, 0.2, 0.7),
    "g": (0.1, 0.55, 0.25),
    "k": (0.05, 0.05, 0.05),
    "y": (0.95, 0.8, 0.1),
}


def flags(label: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    """Tricolours that differ only in colour order and stripe axis: a fine-grained task."""
    n = len(label)
    if clean:
        amp, phase, scale, cx, cy = (torch.zeros(n, 1, 1), torch.zeros(n, 1, 1), torch.ones(n, 1, 1), 0.0, 0.0)
        bg = torch.full((n, 3, 1, 1), 0.5)
    else:
        amp, phase = _u(gen, n, 0, 0.15), _u(gen, n, 0, 2 * math.pi)
        scale = _u(gen, n, 0.65, 0.95)
        cx, cy = _u(gen, n, -0.2, 0.2), _u(gen, n, -0.2, 0.2)
        bg = colour(gen, n, 0.2, 0.8)
    x = (XX - cx) / scale
    y = (YY - cy) / scale + amp * torch.sin(4 * x + phase)  # the flag waves
    inside = _soft(torch.minimum(1 - x.abs(), 0.75 - y.abs()), 15)
    img = bg.expand(n, 3, SIZE, SIZE).clone()
    for cls, name in enumerate(FLAGS):
        sel = label == cls
        if not sel.any():
            continue
        colours, axis = name.split("_")
        coord = y[sel] / 0.75 if axis == "h" else x[sel]
        stripe = ((coord + 1) * 1.5).clamp(0, 2.999).floor().long()  # 0, 1, 2
        rgb = torch.tensor([_PALETTE[ch] for ch in colours])  # [3 stripes, 3 channels]
        flag = rgb[stripe].permute(0, 3, 1, 2)  # [k, 3, S, S]
        img[sel] = fill(inside[sel], flag, img[sel])
    if not clean:
        img = img + 0.3 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    return finish(img, gen, clean)
