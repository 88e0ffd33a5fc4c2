"""Pictures the jobs write next to their numbers."""

from __future__ import annotations

import numpy as np


def confusion_image(matrix: np.ndarray, class_names: list[str], title: str):
    """A row-normalised confusion matrix as a PIL image (no plotting dependency): rows true, columns predicted."""
    from PIL import Image, ImageDraw, ImageFont

    classes, font = len(class_names), ImageFont.load_default()
    cell = max(4, min(28, 900 // max(classes, 1)))
    names = [name[:26] for name in class_names] if cell >= 8 else []  # no names in cells that small
    margin = (min(160, 6 * max(map(len, class_names)) + 8) if names else 10) + 10
    top = margin + 20  # below the title and the column names
    image = Image.new("RGB", (margin + classes * cell + 10, top + classes * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    levels = (255 * (1 - matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1))).astype(np.uint8)  # white..blue
    cells = Image.fromarray(np.stack([levels, levels, np.full_like(levels, 255)], axis=-1))
    image.paste(cells.resize((classes * cell, classes * cell), Image.Resampling.NEAREST), (margin, top))
    for i, name in enumerate(names):
        draw.text((4, top + i * cell + cell // 2 - 5), name, fill="black", font=font)
        strip = Image.new("RGBA", (margin - 10, cell), (255, 255, 255, 0))
        ImageDraw.Draw(strip).text((2, cell // 2 - 5), name, fill="black", font=font)
        image.paste(strip.rotate(90, expand=True), (margin + i * cell, 30), strip.rotate(90, expand=True))
    draw.text((4, 4), f"{title} (rows: true, columns: predicted, row-normalised)", fill="black", font=font)
    return image
