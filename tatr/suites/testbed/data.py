"""Eight procedurally generated image domains for the testbed, each with its own label space.

Each domain mimics one of the paper's eight datasets in spirit (a different input distribution
and a different set of classes), at 16×16 RGB:

| task      | like       | classes                                                        |
|-----------|------------|----------------------------------------------------------------|
| digits    | MNIST/SVHN | 10 handwritten digits (scikit-learn's `load_digits`, real data) |
| shapes    | —          | 8 geometric shapes at random place, size, colour                |
| textures  | DTD        | 8 texture families at random orientation, frequency, colour     |
| counts    | CLEVR-count| 1–6 blobs                                                       |
| signs     | GTSRB      | 8 traffic-sign-like plates with glyphs                          |
| satellite | EuroSAT    | 8 land-cover patterns seen from above                           |
| scenes    | SUN397     | 8 horizon scene layouts                                         |
| flags     | Cars (fine-grained) | 8 tricolour flags differing only in colour order/axis |

The seven procedural domains are drawn by `tatr.suites.testbed.render`; this module holds the
real digits, the task list and how a split or a set of icons is drawn. A generator takes the labels
and a `torch.Generator` and renders a batch at once (vectorised over samples), so a whole split
takes milliseconds. `clean=True` renders the canonical *icon* of each
class (centred, default colours, no noise): the testbed's analogue of a class-name prompt, from
which the frozen zero-shot heads are built. Everything is a pure function of the generator state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tatr.suites.testbed.render import (
    COUNTS,
    FLAGS,
    SATELLITE,
    SCENES,
    SHAPES,
    SIGNS,
    SIZE,
    TEXTURES,
    Render,
    colour,
    counts,
    fill,
    finish,
    flags,
    satellite,
    scenes,
    shapes,
    signs,
    textures,
)

__all__ = ["CLASSES", "SIZE", "TASKS", "digits", "generate", "icons", "load_digit_images", "to_uint8"]


# --- digits (real data) -----------------------------------------------------------------------
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FONT = {  # 3×5 bitmap font: the printed glyph is the icon of a handwritten digit
    0: "111101101101111",
    1: "010110010010111",
    2: "111001111100111",
    3: "111001111001111",
    4: "101101111001001",
    5: "111100111001111",
    6: "111100111101111",
    7: "111001010010010",
    8: "111101111101111",
    9: "111101111001111",
}


def load_digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten 8×8 digits, in [0, 1], in the package's fixed order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32) / 16.0, torch.tensor(data.target, dtype=torch.long)


def digits(images: Tensor, gen: torch.Generator, clean: bool) -> Tensor:
    """Place 8×8 digit images (or, for icons, font glyphs) on a 16×16 canvas with a random tint."""
    n = len(images)
    big = torch.nn.functional.interpolate(images.unsqueeze(1), size=12, mode="bilinear", align_corners=False)
    canvas = torch.zeros(n, 1, SIZE, SIZE)
    if clean:
        canvas[:, :, 2:14, 2:14] = big
        return canvas.expand(n, 3, SIZE, SIZE).clamp(0, 1)
    shifts = torch.randint(1, 4, (n, 2), generator=gen)  # ±1 pixel around the centre
    for i in range(n):
        r, c = int(shifts[i, 0]), int(shifts[i, 1])
        canvas[i, :, r : r + 12, c : c + 12] = big[i]
    fg, bg = colour(gen, n, 0.55, 1.0), colour(gen, n, 0.0, 0.35)  # bright ink on a dark ground
    return finish(fill(canvas.squeeze(1), fg, bg), gen, clean)


def digit_icons() -> tuple[Tensor, Tensor]:
    glyphs = torch.zeros(10, 8, 8)
    for d, bits in _FONT.items():
        glyph = torch.tensor([float(b) for b in bits]).view(5, 3)
        glyphs[d, 1:7, 2:6] = torch.nn.functional.interpolate(glyph[None, None], size=(6, 4), mode="nearest")[0, 0]
    labels = torch.arange(10)
    return digits(glyphs, torch.Generator().manual_seed(0), clean=True), labels


RENDERERS: dict[str, tuple[Render, tuple[str, ...]]] = {
    "shapes": (shapes, SHAPES),
    "textures": (textures, TEXTURES),
    "counts": (counts, COUNTS),
    "signs": (signs, SIGNS),
    "satellite": (satellite, SATELLITE),
    "scenes": (scenes, SCENES),
    "flags": (flags, FLAGS),
}
TASKS = ("digits", "shapes", "textures", "counts", "signs", "satellite", "scenes", "flags")
CLASSES: dict[str, tuple[str, ...]] = {**{t: RENDERERS[t][1] for t in RENDERERS}, "digits": DIGITS}


def generate(task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n labelled samples of a procedural task (balanced-at-random labels), uint8 [n,3,S,S]."""
    render, classes = RENDERERS[task]
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, len(classes), (n,), generator=gen)
    return to_uint8(render(label, gen, False)), label


def icons(task: str) -> tuple[Tensor, Tensor]:
    """One canonical rendering per class: the analogue of the prompt "a photo of a {class}"."""
    if task == "digits":
        x, y = digit_icons()
        return to_uint8(x), y
    render, classes = RENDERERS[task]
    label = torch.arange(len(classes))
    return to_uint8(render(label, torch.Generator().manual_seed(0), True)), label


def to_uint8(img: Tensor) -> Tensor:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)
