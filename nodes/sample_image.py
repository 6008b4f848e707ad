"""A sample init image drawn in code, so `make run` needs no file from anywhere.

A landscape (sky gradient, sun, two hill ranges, a lake) has the large shapes and
soft gradients that image-to-image keeps recognisable at moderate strength, which
makes the effect of strength easy to see in a strength sweep.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter


def draw_landscape(width: int = 512, height: int = 512) -> Image.Image:
    img = Image.new("RGB", (width, height))
    px = img.load()
    horizon = int(height * 0.62)
    for y in range(horizon):
        t = y / max(1, horizon - 1)
        color = (int(40 + 200 * t), int(90 + 120 * t), int(190 + 40 * t))
        for x in range(width):
            px[x, y] = color
    draw = ImageDraw.Draw(img)
    r = width // 9
    cx, cy = int(width * 0.72), int(height * 0.28)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 214, 120))
    for layer, (shade, amp, base) in enumerate([((70, 110, 90), 0.10, 0.50), ((40, 85, 55), 0.07, 0.60)]):
        points = [(0, height)]
        for x in range(0, width + 1, 4):
            wave = math.sin(x / width * math.pi * (2 + layer) + layer) * amp + math.sin(x / width * 17) * 0.012
            points.append((x, int(height * (base - wave))))
        points.append((width, height))
        draw.polygon(points, fill=shade)
    draw.rectangle([0, horizon, width, height], fill=(50, 95, 140))
    for i in range(12):  # reflections on the lake
        y = horizon + 8 + i * (height - horizon) // 13
        w = int(r * (1.2 - i / 14))
        draw.line([cx - w, y, cx + w, y], fill=(230, 190, 120), width=2)
    return img.filter(ImageFilter.GaussianBlur(1.2))


def ensure_sample(path: str | Path, width: int = 512, height: int = 512) -> Path:
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_landscape(width, height).save(path)
    return path
