"""The template thumbnails (workflows/<name>.jpg, the cards of ComfyUI's Templates browser): what each
template does, drawn from the template itself, never a model's output.

Each card shows the template's title (its note's heading), its graph as the chain of its nodes in
execution order, and its input and results on a drawn test picture (benchmarks/synthetic_composites.py)
whose true mask is known: the "cutout" and "mask" panels are that exact mask, labelled as an illustration.
Run it again after changing a template:

    python docs/make_thumbnails.py        # writes workflows/<name>.jpg for every workflows/<name>.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_composites import make_composite  # noqa: E402

WORKFLOWS = ROOT / "workflows"
SIZE = 512  # square: the Templates browser crops cards to a square
MARK = "Illustration drawn by docs/make_thumbnails.py: a synthetic picture and its true mask, not model output"
CAPTION = "Illustration: a drawn test picture and its exact mask, not the model's output"
PANEL, SMALL_PANEL = (244, 183), (160, 120)  # 4:3, two or three across
PICTURE = (300, 400)  # height, width of the drawn test picture
BACKGROUND, TEXT, DIM, WARN = (32, 32, 36), (235, 235, 235), (160, 160, 170), (255, 196, 90)
OURS, CORE = (88, 60, 140), (60, 62, 70)  # node pills: DiffDIS nodes, ComfyUI's own
CHECKER = ((150, 150, 150), (200, 200, 200))
VIRTUAL = {"MarkdownNote", "Note"}


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def display_names() -> dict[str, str]:
    """The pack's node display names, from its V3 schemas (the pack imported as ComfyUI imports it; cheap).
    Without ComfyUI, the tests' stand-in for its node API serves the declarations."""
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "tests"))
        import comfy_api_standin

        comfy_api_standin.install()
    spec = importlib.util.spec_from_file_location("diffdis_pack_for_thumbnails", ROOT / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    schemas = [node.define_schema() for node in sys.modules[f"{spec.name}.nodes"].NODES]
    return {schema.node_id: schema.display_name for schema in schemas}


def node_label(node: dict, names: dict[str, str]) -> str:
    if node.get("title"):
        return node["title"]
    return names.get(node["type"]) or re.sub(r"(?<=[a-z])(?=[A-Z])", " ", node["type"])  # LoadImage -> Load Image


def title_of(workflow: dict) -> str:
    """The heading of the template's note (what the user reads first on the canvas)."""
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL:
            for line in node["widgets_values"][0].splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    raise ValueError("the template has no note with a heading")


def to_image(rgb: torch.Tensor) -> Image.Image:
    pixels = (rgb[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def checkerboard(width: int, height: int, step: int = 12) -> torch.Tensor:
    ys, xs = np.mgrid[0:height, 0:width]
    light = ((ys // step + xs // step) % 2).astype(np.float32)
    dark, bright = (np.array(c, np.float32) / 255 for c in CHECKER)
    board = dark[:, None, None] + (bright - dark)[:, None, None] * light[None]
    return torch.from_numpy(board)[None]


def over(foreground: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    return alpha * foreground + (1 - alpha) * background


def hex_colour(value: int) -> torch.Tensor:
    rgb = [(value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF]
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255


def panels_for(workflow: dict) -> list[tuple[str, Image.Image | str]]:
    """What the template takes and gives, on the drawn picture: (label, image or text) pairs."""
    height, width = PICTURE
    types = {node["type"] for node in workflow["nodes"]}
    board = checkerboard(width, height)
    if "CLIPTextEncode" in types:  # text to image, then the cutout and a composite on a new colour
        prompt = next(n for n in workflow["nodes"] if n["type"] == "CLIPTextEncode" and n.get("title") == "Prompt")
        new_background = next(n for n in workflow["nodes"] if n["type"] == "EmptyImage")["widgets_values"][3]
        drawn = make_composite(height, width, seed=3, noise=0.0)
        subject, alpha = drawn["foreground"], drawn["alpha"]
        generated = over(subject, alpha, torch.full_like(subject, 0.82))  # the prompt asks for plain light grey
        return [("prompt", prompt["widgets_values"][0]),
                ("generated (drawn stand-in)", to_image(generated)),
                ("cutout (RGBA)", to_image(over(subject, alpha, board))),
                ("composite", to_image(over(subject, alpha, hex_colour(new_background))))]
    drawn = make_composite(height, width, seed=0, noise=0.005)
    image, subject, alpha = drawn["image"], drawn["foreground"], drawn["alpha"]
    return [("input", to_image(image)), ("cutout (RGBA)", to_image(over(subject, alpha, board))),
            ("mask", to_image(alpha.expand(-1, 3, -1, -1)))]


def wrap(text: str, draw: ImageDraw.ImageDraw, width: int, face: ImageFont.ImageFont) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=face) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def draw_panel(card: Image.Image, x: int, y: int, label: str, content: Image.Image | str, size=PANEL) -> None:
    draw = ImageDraw.Draw(card)
    draw.text((x, y), label, fill=DIM, font=font(12))
    top = y + 16
    if isinstance(content, str):
        draw.rounded_rectangle([x, top, x + size[0], top + size[1]], radius=6, fill=(48, 48, 54))
        for i, line in enumerate(wrap(f"“{content}”", draw, size[0] - 16, font(14))[:8]):
            draw.text((x + 8, top + 8 + 18 * i), line, fill=TEXT, font=font(14))
    else:
        card.paste(content.resize(size, Image.LANCZOS), (x, top))


def draw_graph(card: Image.Image, workflow: dict, names: dict[str, str], box: tuple[int, int, int, int]) -> None:
    """The template's nodes in execution order, as pills joined by arrows, wrapped to the box."""
    draw = ImageDraw.Draw(card)
    left, top, right, bottom = box
    draw.text((left, top), "graph (nodes in run order)", fill=DIM, font=font(12))
    face, pad, gap, line_height = font(12), 6, 14, 24
    x, y = left, top + 18
    nodes = sorted((n for n in workflow["nodes"] if n["type"] not in VIRTUAL), key=lambda n: n["order"])
    for index, node in enumerate(nodes):
        label = node_label(node, names)
        width = int(draw.textlength(label, font=face)) + 2 * pad
        if x + width > right:
            x, y = left, y + line_height
        if y + line_height > bottom:
            raise ValueError(f"the graph does not fit in {box}")
        colour = OURS if node["type"] in names else CORE
        draw.rounded_rectangle([x, y, x + width, y + 18], radius=9, fill=colour)
        draw.text((x + pad, y + 2), label, fill=TEXT, font=face)
        x += width
        if index < len(nodes) - 1:
            draw.text((x + 2, y + 1), "›", fill=DIM, font=font(14))
            x += gap


def make_thumbnail(name: str, names: dict[str, str]) -> Image.Image:
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    card = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(card)
    for i, line in enumerate(wrap(title_of(workflow), draw, SIZE - 24, font(20))[:2]):
        draw.text((12, 8 + 24 * i), line, fill=TEXT, font=font(20))
    panels = panels_for(workflow)
    if len(panels) == 3:  # input, cutout / mask, graph
        size, positions, graph_box = PANEL, [(8, 40), (260, 40), (8, 243)], (260, 243, SIZE - 8, SIZE - 30)
    else:  # three across, the fourth under them beside the graph
        size, positions = SMALL_PANEL, [(8, 40), (176, 40), (344, 40), (8, 182)]
        graph_box = (176, 182, SIZE - 8, SIZE - 30)
    for (label, content), (x, y) in zip(panels, positions, strict=True):
        draw_panel(card, x, y, label, content, size)
    draw_graph(card, workflow, names, graph_box)
    draw.text((12, SIZE - 22), CAPTION, fill=WARN, font=font(13))
    return card


def main() -> None:
    names = display_names()
    for path in sorted(WORKFLOWS.glob("*.json")):
        target = path.with_suffix(".jpg")
        make_thumbnail(path.stem, names).save(target, quality=90, optimize=True, comment=MARK.encode())
        print(f"wrote {target.relative_to(ROOT)} ({os.path.getsize(target) // 1024} KB)")


if __name__ == "__main__":
    main()
