#!/usr/bin/env python3
"""Draw docs/where-it-acts.png: where PAG, SEG and SAG act in one sampling step.

    .cache/venv/bin/python scripts/draw_diagram.py [output.png]

Needs Pillow only (ComfyUI's environment has it). Uses DejaVu Sans when the system has it, else
Pillow's built-in font.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 1800, 960
OUT = Path(__file__).resolve().parent.parent / "docs" / "where-it-acts.png"

GREY = ("#eceff1", "#607d8b")
BLUE = ("#e3f2fd", "#1e88e5")
ORANGE = ("#fff3e0", "#ef6c00")
GREEN = ("#e8f5e9", "#2e7d32")
PURPLE = ("#f3e5f5", "#8e24aa")
INK = "#212121"


def font(size: int, bold: bool = False):
    names = ["DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"]
    folders = ["/usr/share/fonts/truetype/dejavu/", "/usr/share/fonts/TTF/", ""]
    for folder in folders:
        for name in names:
            try:
                return ImageFont.truetype(folder + name, size)
            except OSError:
                continue
    return ImageFont.load_default(size=size)


F_TITLE, F_HEAD, F_TEXT, F_SMALL = font(30, True), font(21, True), font(18), font(16)


def wrap(draw, text: str, fnt, width: int) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=fnt) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def box(draw, xy, colours, head: str = "", text: str = "", radius: int = 14, width: int = 3):
    x0, y0, x1, y1 = xy
    draw.rounded_rectangle(xy, radius=radius, fill=colours[0], outline=colours[1], width=width)
    y = y0 + 10
    if head:
        for line in wrap(draw, head, F_HEAD, x1 - x0 - 24):
            draw.text((x0 + 12, y), line, font=F_HEAD, fill=colours[1])
            y += 26
    for line in wrap(draw, text, F_TEXT, x1 - x0 - 24):
        draw.text((x0 + 12, y), line, font=F_TEXT, fill=INK)
        y += 23


def arrow(draw, points, colour=INK, width: int = 3):
    draw.line(points, fill=colour, width=width, joint="curve")
    (xa, ya), (xb, yb) = points[-2], points[-1]
    length = max(((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5, 1e-6)
    ux, uy = (xb - xa) / length, (yb - ya) / length
    size = 13
    left = (xb - size * ux + size * 0.55 * uy, yb - size * uy - size * 0.55 * ux)
    right = (xb - size * ux - size * 0.55 * uy, yb - size * uy + size * 0.55 * ux)
    draw.polygon([(xb, yb), left, right], fill=colour)


def draw_diagram(path: Path) -> None:
    image = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(image)
    d.text((30, 20), "One sampling step: where CFG, PAG, SEG and SAG act", font=F_TITLE, fill=INK)
    d.text((30, 60), "Everything is in the sampler's denoised (x0) space; w is CFG, s each node's scale. "
           "Rows without a colour run the model unchanged.", font=F_SMALL, fill="#455a64")

    # the noisy input
    box(d, (30, 330, 230, 460), GREY, "noisy latent", "x at noise level σ")

    # the sampler's own batched forward
    d.rounded_rectangle((280, 100, 1050, 640), radius=18, outline="#90a4ae", width=3)
    d.text((300, 110), "one forward of the diffusion model (the sampler's own batch)", font=F_HEAD, fill="#546e7a")
    rows = [
        (GREY, "negative (uncond)", "unchanged", "x0_u"),
        (BLUE, "positive (cond)", "unchanged", "x0_c"),
        (ORANGE, "PAG: copy of the positive",
         "in the chosen self-attention layers softmax(QKᵀ/√d)·V becomes V: each token attends only to itself "
         "(identity map; on a DiT image tokens still read the text)", "x0_pag"),
        (GREEN, "SEG: copy of the positive",
         "in the chosen self-attention layers the queries Q are Gaussian-blurred over the token grid "
         "(σ = ∞: every query the mean query)", "x0_seg"),
    ]
    tops = [150, 250, 350, 500]
    heights = [80, 80, 130, 125]
    outs = []
    for (colours, head, text, out), top, height in zip(rows, tops, heights):
        box(d, (310, top, 1020, top + height), colours, head, text)
        mid = top + height // 2
        arrow(d, [(230, 395), (265, 395), (265, mid), (308, mid)], "#90a4ae", 2)
        d.text((1070, mid - 14), out, font=F_HEAD, fill=colours[1])
        arrow(d, [(1020, mid), (1065, mid)], colours[1])
        outs.append(mid)

    # SAG records one layer's attention of the reference rows inside that forward
    d.rounded_rectangle((700, 158, 1012, 222), radius=10, fill=PURPLE[0], outline=PURPLE[1], width=2)
    d.multiline_text((712, 163), "SAG reads one layer's attention\nmap here (reference rows)",
                     font=F_SMALL, fill=PURPLE[1], spacing=4)

    # CFG
    box(d, (1240, 150, 1590, 300), BLUE, "CFG (the sampler)", "x0_cfg = x0_u + w·(x0_c − x0_u)")
    arrow(d, [(1160, outs[0]), (1238, outs[0])], GREY[1])
    arrow(d, [(1160, outs[1]), (1210, outs[1]), (1210, 270), (1238, 270)], BLUE[1])

    # SAG lane
    d.text((280, 675), "SAG: the reference is x0_u (x0_c at CFG 1)", font=F_HEAD, fill=PURPLE[1])
    sag = [
        (280, 710, 640, 880, "1. mask", "A = attention each token receives (mean over heads, sum over queries); "
         "mask = A > ψ, upsampled to the latent"),
        (690, 710, 1050, 880, "2. blur inside the mask", "x̂0 = blur(x0_ref)·mask + x0_ref·(1 − mask)"),
        (1100, 710, 1500, 880, "3. one extra forward",
         "re-noise x̂0 with the reference's own noise; the model predicts x0_deg from it"),
    ]
    for x0, y0, x1, y1, head, text in sag:
        box(d, (x0, y0, x1, y1), PURPLE, head, text)
    arrow(d, [(856, 222), (856, 236), (1035, 236), (1035, 655), (460, 655), (460, 708)], PURPLE[1], 2)
    arrow(d, [(640, 795), (688, 795)], PURPLE[1])
    arrow(d, [(1050, 795), (1098, 795)], PURPLE[1])
    arrow(d, [(1185, outs[0]), (1185, 690), (870, 690), (870, 708)], GREY[1], 2)
    d.text((1100, 665), "x0_ref", font=F_SMALL, fill=GREY[1])

    # the sum
    box(d, (1240, 360, 1780, 640), ("#fafafa", INK), "post-CFG: each node adds its term")
    terms = [
        (INK, "x0 = x0_cfg", ""),
        (ORANGE[1], "   + s·(x0_c − x0_pag)", "PAG, Eq. 14"),
        (GREEN[1], "   + s·(x0_c − x0_seg)", "SEG"),
        (PURPLE[1], "   + s·(x̂0 − x0_deg)", "SAG, Eq. 25"),
    ]
    for i, (colour, term, source) in enumerate(terms):
        d.text((1256, 405 + 36 * i), term, font=F_HEAD, fill=colour)
        d.text((1560, 408 + 36 * i), source, font=F_TEXT, fill=colour)
    d.text((1256, 560), "then the sampler's update to the next σ", font=F_TEXT, fill=INK)
    arrow(d, [(1415, 300), (1415, 358)], BLUE[1])
    arrow(d, [(1160, outs[2]), (1238, outs[2])], ORANGE[1])
    arrow(d, [(1160, outs[3]), (1238, outs[3])], GREEN[1])
    arrow(d, [(1500, 795), (1620, 795), (1620, 642)], PURPLE[1])

    d.text((30, 915), "Chained nodes add their terms in the order of the MODEL chain. PAG and SEG copies ride in "
           "the same forward; SAG's extra forward cannot (its input depends on this step's prediction).",
           font=F_SMALL, fill="#455a64")
    image.save(path, optimize=True)


if __name__ == "__main__":
    draw_diagram(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
