"""The example workflows: UI files (what users drag into ComfyUI, also listed as templates) agree
with their API twins (what POST /prompt takes), are laid out readably, carry what the frontend needs
(model download metadata, thumbnails), and the API graphs run through the registered node classes.

Core ComfyUI nodes are stubbed minimally (file in/out, mask to image); ours run for real on the
tiny fixture model.
"""

import asyncio
import concurrent.futures
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.gpu_check import import_pack

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NAMES = ["cutout", "remove_background", "generate_and_cutout"]
COMFY_MODULES = ["folder_paths", "comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils",
                 "comfy.cli_args"]
MODEL_LOADERS = {"DiffDISLoader", "CheckpointLoaderSimple"}
TITLE_BAR = 30  # LiteGraph draws a node's title above its pos, this high (frontend 1.43)
VIEWPORT = (1280, 720)  # a small laptop's window: the note must be on it when a workflow opens
CHROME = (80, 80)  # frontend 1.43's side bar (left) and breadcrumb / tabs (top) cover this much of it

# Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_AFTER_GENERATE = "control_after_generate"  # the UI-only value after a seed widget
# Widget inputs of the core nodes the workflows use, in ComfyUI 0.8's definition order (UI-only
# widgets in brackets). test_comfyui_integration checks this table against a real /object_info.
CORE_WIDGETS = {
    "LoadImage": ["image", "[upload]"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "MaskToImage": [],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", f"[{CONTROL_AFTER_GENERATE}]", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "EmptyImage": ["width", "height", "batch_size", "color"],
    "ImageCompositeMasked": ["x", "y", "resize_source"],
    "SplitImageWithAlpha": [],
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def node_classes(pack) -> dict:
    """node id -> class, as ComfyUI registers a V3 pack: the node list of comfy_entrypoint's extension."""
    async def node_list():
        return await (await pack.comfy_entrypoint()).get_node_list()

    # In a thread of its own: the browser test imports this module inside playwright's running event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        nodes = thread.submit(asyncio.run, node_list()).result()
    return {cls.define_schema().node_id: cls for cls in nodes}


PACK = import_pack("/home/user/ComfyUI/custom_nodes/ComfyUI-DiffDIS")
OUR_NODES = node_classes(PACK)
models = sys.modules[PACK.__name__ + ".nodes.models"]
segmentation = sys.modules[PACK.__name__ + ".nodes.segmentation"]


def load(name: str, api: bool = False) -> dict:
    return json.loads((WORKFLOWS / ("api" if api else "") / f"{name}.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- UI -> API
def widgets_from_input_types(input_types: dict) -> list[str]:
    """Widget names of a node definition (INPUT_TYPES or /object_info "input") in order, with the
    UI-only widgets the frontend adds: the seed control after a seed, the upload button after an image."""
    names = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                names.append(name)
                if options.get(CONTROL_AFTER_GENERATE):
                    names.append(f"[{CONTROL_AFTER_GENERATE}]")
                if options.get("image_upload"):
                    names.append("[upload]")
    return names


def all_inputs(cls) -> dict:
    types = cls.INPUT_TYPES()
    return {**types["required"], **types.get("optional", {})}


def our_widgets(class_type: str) -> list[str] | None:
    cls = OUR_NODES.get(class_type)
    return None if cls is None else widgets_from_input_types(cls.INPUT_TYPES())


def ui_to_api(ui: dict, widget_names) -> dict:
    """What the frontend's "Export (API)" makes of a UI workflow: links by [node id, slot], widget
    values by name, UI-only widgets and frontend-only nodes left out."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        names = widget_names(node["type"])
        assert names is not None, f"unknown node type {node['type']}"
        values = node.get("widgets_values", [])
        assert len(values) == len(names), f"node {node['id']} {node['type']}: widgets {values} vs {names}"
        inputs = {name: value for name, value in zip(names, values, strict=True) if not name.startswith("[")}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def comparable(api: dict) -> dict:
    return {node_id: {"class_type": n["class_type"], "inputs": n["inputs"]} for node_id, n in api.items()}


def local_widget_names(class_type: str) -> list[str] | None:
    return our_widgets(class_type) if class_type in OUR_NODES else CORE_WIDGETS.get(class_type)


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_files_agree(name):
    assert ui_to_api(load(name), local_widget_names) == comparable(load(name, api=True))


@pytest.mark.parametrize("name", NAMES)
def test_ui_links_match_the_node_definitions(name):
    ui = load(name)
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        output = nodes[origin]["outputs"][origin_slot]
        socket = nodes[target]["inputs"][target_slot]
        assert output["type"] == socket["type"] == kind, f"link {link_id}"
        assert link_id in output["links"] and socket["link"] == link_id
    for node in ui["nodes"]:
        cls = OUR_NODES.get(node["type"])
        if cls is None:
            continue
        required = cls.INPUT_TYPES()["required"]
        sockets = {name: spec[0] for name, spec in required.items()
                   if not isinstance(spec[0], list) and spec[0] not in WIDGET_TYPES}
        assert {s["name"]: s["type"] for s in node["inputs"]} == sockets
        assert all(s["link"] is not None for s in node["inputs"]), f"node {node['id']} has an unconnected input"
        outputs = [(o["name"], o["type"]) for o in node["outputs"]]
        assert outputs == list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_only_core_and_diffdis_nodes_without_extension_metadata(name):
    ui, api = load(name), load(name, api=True)
    known = set(CORE_WIDGETS) | set(OUR_NODES)
    assert {node["class_type"] for node in api.values()} <= known
    assert {node["type"] for node in ui["nodes"]} <= known | VIRTUAL_NODES
    assert set(ui["extra"]) <= {"ds"}
    for node in ui["nodes"]:
        assert set(node.get("properties", {})) <= {"Node name for S&R", "models"}


def test_the_workflows_show_every_diffdis_node():
    used = {node["class_type"] for name in NAMES for node in load(name, api=True).values()}
    assert set(OUR_NODES) <= used


@pytest.mark.parametrize("name", NAMES)
def test_every_model_loader_says_where_its_model_comes_from(name):
    """properties.models (name, url, directory) on each loader: what the frontend's missing-models
    panel offers to download, and where to."""
    loaders = [node for node in load(name)["nodes"] if node["type"] in MODEL_LOADERS]
    assert loaders
    for node in loaders:
        (entry,) = node["properties"]["models"]
        assert set(entry) == {"name", "url", "directory"} and entry["url"].startswith("https://huggingface.co/")
        if node["type"] == "DiffDISLoader":
            assert entry["directory"] == "diffdis" and entry["url"].endswith(models.DOWNLOAD_REPO)
            # Not a widget value: the frontend would look for it as a file in models/diffdis and call it missing.
            assert entry["name"] not in node["widgets_values"]
        else:
            assert entry["name"] == node["widgets_values"][0] and entry["url"].endswith("/" + entry["name"])
            assert entry["directory"] == "checkpoints"


def rectangle(node) -> tuple[float, float, float, float]:
    """A node's (left, top, right, bottom) on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_BAR, x + w, y + h


@pytest.mark.parametrize("name", NAMES)
def test_no_node_covers_another(name):
    nodes = load(name)["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (al, at, ar, ab), (bl, bt, br, bb) = rectangle(a), rectangle(b)
            overlap = min(ar, br) > max(al, bl) and min(ab, bb) > max(at, bt)
            assert not overlap, f"{name}: node {a['id']} {a['type']} overlaps node {b['id']} {b['type']}"


@pytest.mark.parametrize("name", NAMES)
def test_the_note_is_in_view_when_the_workflow_opens(name):
    ui = load(name)
    (note,) = [node for node in ui["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    scale, (dx, dy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    left, top, right, bottom = rectangle(note)
    screen = [(left + dx) * scale, (top + dy) * scale, (right + dx) * scale, (bottom + dy) * scale]
    assert CHROME[0] <= screen[0] and CHROME[1] <= screen[1], screen
    assert screen[2] <= VIEWPORT[0] and screen[3] <= VIEWPORT[1], screen
    assert note.get("title")


@pytest.mark.parametrize("name", NAMES)
def test_notes_tooltips_and_docs_give_one_download_size(name):
    note = next(node for node in load(name)["nodes"] if node["type"] == "MarkdownNote")
    assert models.DOWNLOAD_SIZE in note["widgets_values"][0]
    for document in (ROOT / "README.md", ROOT / "docs" / "comfyui.md"):
        text = document.read_text(encoding="utf-8")
        assert models.DOWNLOAD_SIZE in text, document
        assert "about 4 GB" not in text and "about 5 GB" not in text, document


@pytest.mark.parametrize("name", NAMES)
def test_each_template_has_a_thumbnail(name):
    """The Templates dialog shows workflows/<name>.jpg on the workflow's card."""
    with Image.open(WORKFLOWS / f"{name}.jpg") as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 256 and max(thumbnail.size) <= 1024
        pixels = np.asarray(thumbnail.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # a picture, not a blank
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_are_valid_for_our_nodes(name):
    for node in load(name, api=True).values():
        cls = OUR_NODES.get(node["class_type"])
        if cls is None:
            continue
        inputs = all_inputs(cls)
        assert set(node["inputs"]) == set(inputs)  # optional ones too: the workflow states every choice
        for key, value in node["inputs"].items():
            kind, options = inputs[key][0], inputs[key][1]
            if kind == "COMBO":
                assert value in options["options"]
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"]
        if node["class_type"] == "DiffDISLoader":
            assert node["inputs"]["model"] == models.DOWNLOAD_ENTRY  # works on a fresh install


SAVED_BEFORE_V3 = ROOT / "tests" / "fixtures" / "saved_workflows" / "before_v3"
# Core nodes that keep an RGBA image's alpha: the only ones an RGBA cutout may go to in the templates.
# Others (VAE Encode, upscalers, Image Composite Masked...) drop it and show the old background again.
KEEP_ALPHA = {"SaveImage", "PreviewImage", "SplitImageWithAlpha"}
CUTOUT_NODES = {"DiffDISApplyAlpha", "DiffDISRemoveBackground"}


def saved_before_v3(name: str, api: bool = False) -> dict:
    return json.loads((SAVED_BEFORE_V3 / ("api" if api else "") / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NAMES)
def test_graphs_saved_before_the_v3_schema_read_the_same(name):
    """The workflows as shipped on the classic node API: their widget values, read with today's node
    definitions, still give their API twins, and every link still joins an output and an input of one type."""
    ui = saved_before_v3(name)
    assert ui_to_api(ui, local_widget_names) == comparable(saved_before_v3(name, api=True))
    nodes = {node["id"]: node for node in ui["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        cls = OUR_NODES.get(nodes[origin]["type"])
        if cls is not None:
            assert cls.RETURN_TYPES[origin_slot] == kind and cls.RETURN_NAMES[origin_slot] == \
                nodes[origin]["outputs"][origin_slot]["name"], f"link {link_id}"
        cls = OUR_NODES.get(nodes[target]["type"])
        if cls is not None:
            socket = nodes[target]["inputs"][target_slot]
            assert all_inputs(cls)[socket["name"]][0] == kind, f"link {link_id}"


@pytest.mark.parametrize("name", NAMES)
def test_no_rgba_cutout_goes_to_a_node_that_drops_alpha(name):
    for graph in (load(name, api=True), saved_before_v3(name, api=True)):
        for node in graph.values():
            for value in node["inputs"].values():
                if isinstance(value, list) and graph[value[0]]["class_type"] in CUTOUT_NODES and value[1] == 0 and \
                        graph[value[0]]["inputs"]["background"] == "alpha":
                    assert node["class_type"] in KEEP_ALPHA, f"{name}: RGBA cutout into {node['class_type']}"


# ---------------------------------------------------------------------------- running the API graph
class LoadImage:
    """Core LoadImage, minimally: an image file from the input folder as IMAGE and MASK."""

    input_dir: Path = None

    def load_image(self, image):
        with Image.open(self.input_dir / image) as picture:
            rgba = picture.convert("RGBA")
        array = np.asarray(rgba, dtype=np.float32) / 255.0
        return torch.from_numpy(array[..., :3])[None], 1.0 - torch.from_numpy(array[..., 3])[None]


class SaveImage:
    """Core SaveImage, minimally: each image of the batch as a PNG (RGBA when it has 4 channels)."""

    output_dir: Path = None
    saved: list = []

    def save_images(self, images, filename_prefix="ComfyUI"):
        for index, image in enumerate(images):
            path = self.output_dir / f"{filename_prefix.replace('/', '_')}_{index:05}_.png"
            Image.fromarray(np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)).save(path)
            SaveImage.saved.append((filename_prefix, path))
        return ()


class PreviewImage:
    previews: list = []

    def save_images(self, images):
        PreviewImage.previews.append(images)
        return ()


class MaskToImage:
    def mask_to_image(self, mask):
        return (mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3),)


CORE_STUBS = {"LoadImage": (LoadImage, "load_image"), "SaveImage": (SaveImage, "save_images"),
              "PreviewImage": (PreviewImage, "save_images"), "MaskToImage": (MaskToImage, "mask_to_image")}


def dependency_order(prompt: dict) -> list[str]:
    remaining = dict(prompt)
    order = []
    while remaining:
        ready = sorted((node_id for node_id, node in remaining.items()
                        if all(not isinstance(v, list) or v[0] in order for v in node["inputs"].values())), key=int)
        assert ready, f"a cycle or a dangling link among {sorted(remaining)}"
        order.extend(ready)
        for node_id in ready:
            del remaining[node_id]
    return order


HIDDEN_VALUES = {"PROMPT": lambda prompt, node_id: prompt, "UNIQUE_ID": lambda prompt, node_id: node_id}


def execute(prompt: dict, stubs: dict) -> dict:
    """Run an API-format prompt as ComfyUI does: through the pack's on-prompt handler (POST /prompt), then
    each node with the inputs it declares and its hidden inputs (the prompt, its id); our node classes for
    our nodes, ``stubs`` for core ones."""
    segmentation.mark_edge_use({"prompt": prompt})
    results = {}
    for node_id in dependency_order(prompt):
        node = prompt[node_id]
        kwargs = {key: results[value[0]][value[1]] if isinstance(value, list) else value
                  for key, value in node["inputs"].items()}
        if node["class_type"] in OUR_NODES:
            cls = OUR_NODES[node["class_type"]]
            kwargs.pop(segmentation.EDGE_USE_KEY, None)  # for ComfyUI's cache key; no input, not passed
            assert set(cls.INPUT_TYPES()["required"]) <= set(kwargs) <= set(all_inputs(cls))
            # ComfyUI runs a V3 node's execute on a copy of its class that holds the hidden inputs' values.
            hidden = {name: HIDDEN_VALUES[kind](prompt, node_id)
                      for name, (kind,) in cls.INPUT_TYPES().get("hidden", {}).items()}
            run_copy = type(cls.__name__, (cls,), {"hidden": types.SimpleNamespace(**hidden)})
            function = lambda run_copy=run_copy, **inputs: run_copy.execute(**inputs).args  # noqa: E731
        else:
            cls, function_name = stubs[node["class_type"]]
            function = getattr(cls(), function_name)
        results[node_id] = function(**kwargs)
    return results


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch, official_tiny):
    """Models, input and output folders like ComfyUI's, and no ComfyUI modules importable."""
    for name in COMFY_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    models_dir = tmp_path / "models" / "diffdis"
    shutil.copytree(official_tiny, models_dir / "tiny", ignore=shutil.ignore_patterns("inputs.*", "expected.*"))
    monkeypatch.setenv("DIFFDIS_MODELS_DIR", str(models_dir))
    for folder in ("input", "output"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(LoadImage, "input_dir", tmp_path / "input")
    monkeypatch.setattr(SaveImage, "output_dir", tmp_path / "output")
    monkeypatch.setattr(SaveImage, "saved", [])
    monkeypatch.setattr(PreviewImage, "previews", [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread
    yield tmp_path
    torch.set_num_threads(threads)


def for_tiny_model(prompt: dict) -> dict:
    """The test model and its processing resolution instead of the released model's."""
    for node in prompt.values():
        if node["class_type"] == "DiffDISLoader":
            node["inputs"]["model"] = "tiny"
        if node["class_type"] in ("DiffDISEncodeCondition", "DiffDISRemoveBackground", "DiffDISApplyAlpha") and \
                "processing_res" in node["inputs"]:
            node["inputs"]["processing_res"] = 64
    return prompt


@pytest.fixture
def decoded_maps(monkeypatch) -> list:
    """The batch size of every VAE decoder call, whatever model the prompt loads."""
    from diffdis_core.vae_memory import BandedDecoder as Decoder  # the decoder class every pipeline's VAE has

    calls = []
    original = Decoder.forward

    def counted(self, z, *args, **kwargs):
        calls.append(z.shape[0])
        return original(self, z, *args, **kwargs)

    monkeypatch.setattr(Decoder, "forward", counted)
    return calls


def estimated_colours(picture: np.ndarray, alpha: torch.Tensor) -> np.ndarray:
    """What refine_foreground puts under ``alpha``: the estimated foreground, as 8-bit SaveImage writes it."""
    from diffdis_core import estimate_foreground

    pixels = torch.from_numpy(picture[..., :3].astype(np.float32) / 255.0).movedim(-1, 0)[None]
    colours = estimate_foreground(pixels, alpha.reshape(1, 1, *alpha.shape[-2:]))[0].movedim(0, -1)
    return np.clip(255.0 * colours.numpy(), 0, 255).astype(np.uint8)


def test_cutout_api_workflow_saves_an_rgba_cutout(comfy_dirs, decoded_maps):
    width, height = 56, 40
    picture = np.zeros((height, width, 4), np.uint8)
    picture[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    picture[10:30, 15:40, 1] = 200
    picture[..., 3] = 128  # an RGBA input: its alpha must not leak into the cutout
    Image.fromarray(picture, "RGBA").save(comfy_dirs / "input" / "test.png")
    prompt = for_tiny_model(load("cutout", api=True))
    loads = [node for node in prompt.values() if node["class_type"] == "LoadImage"]
    assert len(loads) == 1
    loads[0]["inputs"]["image"] = "test.png"

    results = execute(prompt, CORE_STUBS)

    decode_id = next(i for i, n in prompt.items() if n["class_type"] == "DiffDISDecode")
    assert prompt[decode_id]["inputs"]["decode"] == "auto"  # nothing here uses the edge: the mask only
    assert decoded_maps == [1]
    mask, edge = results[decode_id]
    assert mask.shape == edge.shape == (1, height, width) and edge.abs().max() == 0
    assert len(SaveImage.saved) == 1
    prefix, path = SaveImage.saved[0]
    assert prefix == "DiffDIS/cutout"
    with Image.open(path) as saved:
        assert saved.mode == "RGBA" and saved.size == (width, height)
        cutout = np.asarray(saved)
    # The picture is no larger than processing_res: the mask as decoded, the subject's colours under it.
    expected_rgb = estimated_colours(picture, mask)
    assert np.abs(cutout[..., :3].astype(int) - expected_rgb).max() <= 1
    assert np.abs(cutout[..., :3].astype(int) - picture[..., :3]).max() > 8
    expected_alpha = np.clip(255.0 * mask[0].numpy(), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(cutout[..., 3], expected_alpha)
    assert cutout[..., 3].max() > cutout[..., 3].min()
    (preview,) = PreviewImage.previews
    assert preview.shape == (1, height, width, 3)
    torch.testing.assert_close(preview[..., 0], mask)


def test_remove_background_api_workflow_saves_the_same_cutout_in_one_node(comfy_dirs):
    # Not larger than the processing size: with one, Remove Background refines the edges from the
    # processing-size mask, which the staged graph's MASK no longer is (tests/test_nodes.py).
    width, height = 56, 40
    picture = np.zeros((height, width, 3), np.uint8)
    picture[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    picture[8:32, 12:44] = (230, 200, 40)
    Image.fromarray(picture).save(comfy_dirs / "input" / "test.png")
    staged = for_tiny_model(load("cutout", api=True))
    one_node = for_tiny_model(load("remove_background", api=True))
    for prompt in (staged, one_node):
        (load_image,) = [node for node in prompt.values() if node["class_type"] == "LoadImage"]
        load_image["inputs"]["image"] = "test.png"
    assert [n["class_type"] for n in one_node.values()].count("DiffDISRemoveBackground") == 1

    execute(staged, CORE_STUBS)
    execute(one_node, CORE_STUBS)

    by_prefix = dict(SaveImage.saved)
    assert set(by_prefix) == {"DiffDIS/cutout", "DiffDIS/remove_background"}
    with Image.open(by_prefix["DiffDIS/cutout"]) as a, Image.open(by_prefix["DiffDIS/remove_background"]) as b:
        assert b.mode == "RGBA" and b.size == (width, height)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same settings, same cutout
    staged_preview, one_node_preview = PreviewImage.previews
    torch.testing.assert_close(one_node_preview, staged_preview)


def test_a_cutout_graph_saved_before_the_new_options_still_runs(comfy_dirs, decoded_maps):
    """The API cutout graph as shipped before Load DiffDIS had two outputs, Decode its decode option and
    Apply Alpha its refinements: it runs unchanged, and as it previews the edge, Decode (auto) still
    decodes it. Without that preview the same graph decodes the mask only."""
    picture = np.full((40, 56, 3), 90, np.uint8)
    picture[10:30, 14:40] = (200, 60, 30)
    Image.fromarray(picture).save(comfy_dirs / "input" / "test.png")
    saved = json.loads((ROOT / "tests" / "fixtures" / "saved_workflows" / "cutout_api.json").read_text())
    prompt = for_tiny_model(saved)
    prompt["1"]["inputs"]["image"] = "test.png"
    assert "decode" not in prompt["5"]["inputs"] and prompt["3"]["inputs"]["model"] == ["2", 0]
    assert not {"refine_foreground", "refine_edges", "processing_res"} & set(prompt["6"]["inputs"])
    assert prompt["6"]["class_type"] == "DiffDISApplyAlpha"
    edge_users = [i for i, n in prompt.items() if n["inputs"].get("mask") == ["5", 1]]
    assert edge_users
    results = execute(prompt, CORE_STUBS)
    assert decoded_maps == [1, 1]  # the mask, then the edge
    mask, edge = results["5"]
    assert mask.shape == edge.shape == (1, 40, 56) and edge.max() > 0
    mask_preview, edge_preview = PreviewImage.previews
    torch.testing.assert_close(edge_preview[..., 0], edge)
    cutout, _, _ = results["6"]  # the new defaults: the subject's colours under the mask
    torch.testing.assert_close(cutout[..., 3], mask)
    assert not torch.allclose(cutout[..., :3], torch.from_numpy(picture / 255.0).float()[None])

    decoded_maps.clear()
    PreviewImage.previews.clear()
    without_edge = for_tiny_model(json.loads((ROOT / "tests" / "fixtures" / "saved_workflows" /
                                              "cutout_api.json").read_text()))
    without_edge["1"]["inputs"]["image"] = "test.png"
    for node_id in edge_users:
        del without_edge[node_id]
        without_edge = {i: n for i, n in without_edge.items()
                        if not any(v == [node_id, 0] for v in n["inputs"].values())}
    results = execute(without_edge, CORE_STUBS)
    assert decoded_maps == [1]
    torch.testing.assert_close(results["5"][0], mask, atol=0, rtol=0)


# Stand-ins for the text-to-image part, so the DiffDIS part of generate_and_cutout runs as wired.
class CheckpointLoaderSimple:
    def load_checkpoint(self, ckpt_name):
        return "MODEL", "CLIP", "VAE"


class CLIPTextEncode:
    def encode(self, clip, text):
        return (f"CONDITIONING({text})",)


class EmptyLatentImage:
    def generate(self, width, height, batch_size):
        return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)


class KSampler:
    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
        return (latent_image,)


class VAEDecode:
    """A picture the size the latent decodes to: a bright disc on a dark background."""

    def decode(self, vae, samples):
        batch, _, h, w = samples["samples"].shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8 * h), torch.linspace(-1, 1, 8 * w), indexing="ij")
        disc = (ys ** 2 + xs ** 2 < 0.4).float()[None, ..., None]
        return ((0.2 + 0.7 * disc) * torch.tensor([1.0, 0.8, 0.6])).expand(batch, -1, -1, -1),


class EmptyImage:
    def generate(self, width, height, batch_size, color):
        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF]) / 255.0
        return (rgb.expand(batch_size, height, width, 3).clone(),)


class SplitImageWithAlpha:
    def split(self, image):  # as core's: the colours, and the inverse of the alpha channel
        return image[..., :3], 1.0 - image[..., 3]


class ImageCompositeMasked:
    def composite(self, destination, source, x, y, resize_source, mask=None):
        assert (x, y, resize_source) == (0, 0, False) and destination.shape == source.shape
        alpha = mask.reshape(-1, mask.shape[-2], mask.shape[-1])[..., None]
        return (source * alpha + destination * (1 - alpha),)


GENERATE_STUBS = {**CORE_STUBS, **{cls.__name__: (cls, function) for cls, function in [
    (CheckpointLoaderSimple, "load_checkpoint"), (CLIPTextEncode, "encode"), (EmptyLatentImage, "generate"),
    (KSampler, "sample"), (VAEDecode, "decode"), (EmptyImage, "generate"), (ImageCompositeMasked, "composite"),
    (SplitImageWithAlpha, "split")]}}


@pytest.mark.parametrize("name", NAMES)
def test_api_graphs_saved_before_the_v3_schema_still_run(comfy_dirs, name):
    """What the shipped API twins saved on the classic node API give now: the same files, RGBA cutouts."""
    picture = np.full((40, 56, 3), 90, np.uint8)
    picture[10:30, 14:40] = (200, 60, 30)
    Image.fromarray(picture).save(comfy_dirs / "input" / "example.png")
    execute(for_tiny_model(saved_before_v3(name, api=True)), GENERATE_STUBS)
    assert SaveImage.saved
    for prefix, path in SaveImage.saved:
        with Image.open(path) as saved:
            assert saved.mode == ("RGB" if prefix == "DiffDIS/composite" else "RGBA"), prefix


def test_generate_and_cutout_api_workflow_wires_diffdis_between_core_nodes(comfy_dirs):
    prompt = for_tiny_model(load("generate_and_cutout", api=True))
    results = execute(prompt, GENERATE_STUBS)
    by_prefix = dict(SaveImage.saved)
    assert set(by_prefix) == {"DiffDIS/generated_cutout", "DiffDIS/composite"}
    with Image.open(by_prefix["DiffDIS/generated_cutout"]) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == (512, 512)
    with Image.open(by_prefix["DiffDIS/composite"]) as composite:
        assert composite.mode == "RGB" and composite.size == (512, 512)
    decode_id = next(i for i, n in prompt.items() if n["class_type"] == "DiffDISDecode")
    assert results[decode_id][0].shape == (1, 512, 512)
    # The composite is made of the cutout's own (refined) colours and its alpha, not the generated pixels.
    apply_id = next(i for i, n in prompt.items() if n["class_type"] == "DiffDISApplyAlpha")
    composite_id = next(i for i, n in prompt.items() if n["class_type"] == "ImageCompositeMasked")
    background_id = prompt[composite_id]["inputs"]["destination"][0]
    rgba, alpha, _ = results[apply_id]
    (background,) = results[background_id]
    expected = rgba[..., :3] * alpha[..., None] + background * (1 - alpha[..., None])
    torch.testing.assert_close(results[composite_id][0], expected, atol=1e-6, rtol=0)
