"""The example workflows in ComfyUI's real frontend, in headless Chromium, as a user would use them.

Runs only when ``COMFYUI_PATH`` points to a ComfyUI (with a frontend: 0.21 brings 1.43) and the
running Python has playwright and a Chromium (``CHROMIUM_PATH``, default /usr/bin/chromium, e.g.
Debian's package; playwright's own browser download is not needed). The server is the one
tests/test_comfyui_integration.py starts. Each UI workflow is dropped onto the canvas (a drop event
with the file, as from a file manager); then no node may be missing or cover another, and every
widget must hold the saved value. ``cutout.json`` is then run from the Run button. Screenshots go to
``COMFYUI_SCREENSHOTS`` when set.
"""

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _integration_module():
    """tests/test_comfyui_integration.py, for its ComfyUI server fixture."""
    path = Path(__file__).with_name("test_comfyui_integration.py")
    spec = importlib.util.spec_from_file_location("diffdis_test_comfyui_integration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_integration = _integration_module()
COMFYUI_PATH, IMAGE_SIZE, PACK_FOLDER = _integration.COMFYUI_PATH, _integration.IMAGE_SIZE, _integration.PACK_FOLDER
RUN_TIMEOUT_S = _integration.RUN_TIMEOUT_S
comfyui = _integration.comfyui  # the module-scoped server fixture

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
SCREENSHOTS = os.environ.get("COMFYUI_SCREENSHOTS")
# Headless, offline, no first-run chores: the flags under which Chromium runs on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 900}

playwright_api = pytest.importorskip("playwright.sync_api", reason="install playwright to run the browser test")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run"),
    pytest.mark.skipif(not shutil.which(CHROMIUM) and not Path(CHROMIUM).is_file(),
                       reason=f"no Chromium at {CHROMIUM} (set CHROMIUM_PATH)"),
]

DROP_FILE = """async ([text, name]) => {
    const data = new DataTransfer();
    data.items.add(new File([text], name, {type: "application/json"}));
    const canvas = document.querySelector("#graph-canvas");
    for (const type of ["dragenter", "dragover", "drop"]) {
        canvas.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true,
                                                  clientX: 600, clientY: 400}));
    }
}"""

GRAPH_STATE = """() => window.app.graph._nodes.map(node => ({
    id: node.id, type: node.type, title: node.title,
    registered: Boolean(LiteGraph.registered_node_types[node.type]),
    rect: Array.from(node.boundingRect),
    widgets: (node.widgets || []).map(w => [w.name, w.value]),
    inputs: (node.inputs || []).filter(i => i.link != null).map(i => {
        const link = window.app.graph.links.get ? window.app.graph.links.get(i.link) : window.app.graph.links[i.link];
        return [i.name, link.origin_id, link.origin_slot];
    }),
}))"""


@pytest.fixture(scope="module")
def page(comfyui):  # noqa: F811
    # A returning user: no first-run template browser over the canvas.
    comfyui.post("/settings/Comfy.TutorialCompleted", True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        messages = []
        page.on("console", lambda message: messages.append(f"{message.type}: {message.text}"))
        started = time.monotonic()
        page.goto(comfyui.url)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                               "LiteGraph.registered_node_types['DiffDISRemoveBackground']", timeout=120_000)
        print(f"\nfrontend ready in {time.monotonic() - started:.1f} s")
        page.messages = messages
        yield page
        browser.close()


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


SAVED_BEFORE = ROOT / "tests" / "fixtures" / "saved_workflows" / "cutout_ui.json"


def drop(page, name: str, path: Path | None = None) -> list[dict]:
    """Drop workflows/<name>.json (or ``path``) onto the canvas; the graph's nodes once all are there."""
    text = (path or WORKFLOWS / f"{name}.json").read_text(encoding="utf-8")
    expected = len(json.loads(text)["nodes"])
    page.keyboard.press("Escape")
    page.evaluate(DROP_FILE, [text, f"{name}.json"])
    page.wait_for_function(f"() => window.app.graph._nodes.length === {expected}", timeout=30_000)
    page.wait_for_timeout(1500)  # let the frontend finish sizing nodes and images
    return page.evaluate(GRAPH_STATE)


def overlapping(a: list[float], b: list[float]) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)


def press_run(page, comfyui, before: set) -> tuple[dict, float]:
    """Press the frontend's Run button and wait for the prompt it queues (one not in ``before``, the
    history's ids before the press): its history entry, and when the button was pressed."""
    page.locator(".p-blockui-mask").wait_for(state="detached", timeout=20_000)  # a loading overlay, if any
    started = time.monotonic()
    page.get_by_role("button", name=re.compile(r"^Run\b")).first.click()
    while time.monotonic() - started < RUN_TIMEOUT_S:
        new = set(comfyui.get("/history")) - before
        if new:
            (prompt_id,) = new
            return comfyui.wait(prompt_id), started
        time.sleep(0.2)
    raise AssertionError("the Run button queued nothing\n" + "\n".join(page.messages[-20:]))


@pytest.mark.parametrize("name", ["cutout", "remove_background", "generate_and_cutout"])
def test_dropped_workflow_loads_whole_and_readable(page, name):
    nodes = drop(page, name)
    screenshot(page, name)
    missing = [node["type"] for node in nodes if not node["registered"]]
    assert not missing, f"missing nodes: {missing}"
    assert not page.get_by_text(re.compile("missing node", re.IGNORECASE)).is_visible()
    # The frontend's error panel: nothing for the DiffDIS workflows on a ComfyUI with its example.png; the
    # text-to-image one misses its SD checkpoint (which properties.models offers to download).
    errors = page.get_by_text(re.compile(r"^\d+ ERRORS?$"))
    if name == "generate_and_cutout":
        # Frontend 1.43 says so in its error panel, 1.35 opens a Missing Models dialog: either way the
        # checkpoint is listed with the download that properties.models gives.
        show = page.get_by_text("Show missing models")
        if show.count() and show.first.is_visible():
            show.first.click()
        listed = page.get_by_text(re.compile("v1-5-pruned-emaonly-fp16.safetensors"))
        listed.first.wait_for(state="visible", timeout=10_000)
        screenshot(page, f"{name}_missing_models")
        page.keyboard.press("Escape")
    elif (Path(COMFYUI_PATH) / "input" / "example.png").is_file():
        assert errors.count() == 0 or not errors.first.is_visible(), page.get_by_text(re.compile("missing")).all_inner_texts()
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not overlapping(a["rect"], b["rect"]), f"{a['title']} {a['rect']} overlaps {b['title']} {b['rect']}"
    assert_links_and_widgets_as_saved(nodes, json.loads((WORKFLOWS / f"{name}.json").read_text()))


def assert_links_and_widgets_as_saved(nodes: list[dict], graph: dict) -> None:
    """Every link lands on the input it was saved to, by name (core nodes reorder inputs between versions),
    from the same output slot; every widget holds its saved value."""
    saved = {node["id"]: node for node in graph["nodes"]}
    saved_links = {link[0]: link for link in graph["links"]}
    expected_inputs = {}
    for node in saved.values():
        for socket in node["inputs"]:
            if socket.get("link") is not None:
                _, origin, slot, *_ = saved_links[socket["link"]]
                expected_inputs.setdefault(node["id"], set()).add((socket["name"], origin, slot))
    assert {node["id"]: {tuple(i) for i in node["inputs"]} for node in nodes if node["inputs"]} == expected_inputs
    for node in nodes:
        values = [value for widget_name, value in node["widgets"] if widget_name not in ("upload", "$$canvas-image-preview")]
        expected = saved[node["id"]]["widgets_values"]
        if node["type"] == "LoadImage":
            continue  # its image is whatever the input folder has; the list check is the integration test's
        assert values == expected, f"{node['title']}: {values} != {expected}"


@pytest.mark.parametrize("name", ["cutout", "remove_background", "generate_and_cutout"])
def test_a_workflow_saved_before_the_v3_schema_loads_as_saved(page, name):
    """The workflows as shipped on the classic node API: whole, links and widget values as saved, and the
    cutout nodes show their new rgb output after image and mask."""
    path = ROOT / "tests" / "fixtures" / "saved_workflows" / "before_v3" / f"{name}.json"
    nodes = drop(page, f"before_v3_{name}", path)
    assert all(node["registered"] for node in nodes)
    assert_links_and_widgets_as_saved(nodes, json.loads(path.read_text()))
    for node in nodes:
        if node["type"] in ("DiffDISApplyAlpha", "DiffDISRemoveBackground"):
            outputs = page.evaluate(f"() => window.app.graph.getNodeById({node['id']}).outputs.map(o => o.type)")
            assert outputs == ["IMAGE", "MASK", "IMAGE"], node["type"]
    page.keyboard.press("Escape")  # generate_and_cutout's missing-checkpoint notice


def test_a_workflow_saved_before_the_new_outputs_loads_and_keeps_its_links(page):
    """cutout.json as shipped before Load DiffDIS had a second output: every node is there, the
    model links still leave slot 0, and the frontend shows the new bg_removal_model output."""
    saved = json.loads(SAVED_BEFORE.read_text())
    nodes = drop(page, "saved_before", SAVED_BEFORE)
    assert all(node["registered"] for node in nodes)
    loader = next(node for node in saved["nodes"] if node["type"] == "DiffDISLoader")
    links = [(name, origin, slot) for node in nodes for name, origin, slot in node["inputs"] if origin == loader["id"]]
    assert len(links) == 3 and all(name == "model" and slot == 0 for name, origin, slot in links)
    outputs = page.evaluate(f"() => window.app.graph.getNodeById({loader['id']}).outputs.map(o => o.type)")
    assert outputs == ["DIFFDIS_MODEL", "BACKGROUND_REMOVAL"]
    # Options added since: their defaults (decode auto, which decodes the edge this graph previews; the cutout
    # refinements on), the saved values kept.
    widgets = {node["type"]: dict(node["widgets"]) for node in nodes}
    saved_widgets = {node["type"]: node.get("widgets_values") for node in saved["nodes"]}
    assert widgets["DiffDISDecode"] == {"normalize": saved_widgets["DiffDISDecode"][0], "decode": "auto"}
    apply_alpha = widgets["DiffDISApplyAlpha"]
    assert list(apply_alpha.values())[:6] == saved_widgets["DiffDISApplyAlpha"]
    assert (apply_alpha["refine_foreground"], apply_alpha["refine_edges"], apply_alpha["processing_res"]) == \
        (True, True, 1024)


def test_templates_dialog_has_the_workflows_with_thumbnails(comfyui):  # noqa: F811
    templates = comfyui.get("/workflow_templates")[PACK_FOLDER]
    assert sorted(templates) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    for name in templates:
        with urllib_open(f"{comfyui.url}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg") as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"


def urllib_open(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=30)


def test_cutout_runs_from_the_run_button(page, comfyui):  # noqa: F811
    drop(page, "cutout")
    # The test picture and the tiny model's size; the model entry finds the complete models/diffdis/DiffDIS.
    page.evaluate("""() => {
        for (const node of window.app.graph._nodes) {
            for (const widget of node.widgets || []) {
                if (node.type === "LoadImage" && widget.name === "image") widget.value = "diffdis_test.png";
                if (widget.name === "processing_res") widget.value = 64;
            }
        }
    }""")
    before = set(comfyui.get("/history"))
    screenshot(page, "cutout_before_run")
    entry, started = press_run(page, comfyui, before)
    print(f"\ncutout.json from the Run button: done in {time.monotonic() - started:.1f} s")
    page.wait_for_timeout(1000)
    screenshot(page, "cutout_after_run")
    prompt = entry["prompt"][2]
    assert {node["class_type"] for node in prompt.values()} >= {"DiffDISLoader", "DiffDISEncodeCondition",
                                                                 "DiffDISOneStepSegment", "DiffDISDecode",
                                                                 "DiffDISApplyAlpha", "SaveImage"}
    save_id = next(i for i, n in prompt.items() if n["class_type"] == "SaveImage")
    (image,) = entry["outputs"][save_id]["images"]
    with Image.open(comfyui.base / "output" / image["subfolder"] / image["filename"]) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == IMAGE_SIZE
        alpha = np.asarray(cutout)[..., 3]
    assert alpha.max() > alpha.min()


BLUEPRINT = "Remove Background (DiffDIS)"
NODE_STATE = """(before) => window.app.graph._nodes.filter(node => !before.includes(node.id)).map(node => ({
    id: node.id, title: node.title,
    subgraph: Boolean(node.subgraph),
    inputs: (node.inputs || []).map(i => [i.name, i.type]),
    outputs: (node.outputs || []).map(o => [o.name, o.type]),
    widgets: (node.widgets || []).map(w => [w.name, w.value]),
    inner: node.subgraph ? node.subgraph.nodes.map(inner => inner.type).sort() : [],
}))"""


def test_the_blueprint_is_placed_from_the_node_library_and_runs(page, comfyui):  # noqa: F811
    """The pack's subgraph blueprint in the node library (Subgraph Blueprints, found by searching
    "DiffDIS"), picked and dropped on an empty canvas: one node, image in, cutout and mask out, the
    model choice on its face. Wired to Load Image and Save Image and run from the Run button."""
    page.keyboard.press("Escape")
    page.evaluate("() => { window.app.graph.clear(); window.app.canvas.setDirty(true, true); }")
    before = page.evaluate("() => window.app.graph._nodes.map(node => node.id)")
    library = page.get_by_role("button", name=re.compile(r"^Node Library"))
    library.click()
    page.get_by_placeholder(re.compile(r"^Search")).first.fill("DiffDIS")  # 1.43: "Search...", 1.35: "Search Nodes..."
    item = page.get_by_role("treeitem").filter(has_text=re.compile(rf"^\s*{re.escape(BLUEPRINT)}\s*$"))
    item.first.wait_for(state="visible", timeout=20_000)
    item.first.click()  # picks the node up; the next click on the canvas puts it down
    placed_one = f"() => window.app.graph._nodes.length === {len(before) + 1}"
    page.mouse.move(1000, 600)
    page.mouse.click(1000, 600)
    try:
        page.wait_for_function(placed_one, timeout=5_000)
    except playwright_api.TimeoutError:
        # On a busy machine the click can come before the frontend has the node in hand (it loads the
        # blueprint first), as a user's impatient click would; the node then follows the mouse: click again.
        screenshot(page, "blueprint_not_put_down_yet")
        page.mouse.move(1010, 610)
        page.mouse.click(1010, 610)
        page.wait_for_function(placed_one, timeout=10_000)
    screenshot(page, "blueprint_placed")
    (placed,) = page.evaluate(NODE_STATE, before)
    assert placed["title"] == BLUEPRINT and placed["subgraph"]
    assert placed["inputs"][0] == ["image", "IMAGE"]
    assert placed["outputs"] == [["cutout", "IMAGE"], ["mask", "MASK"]]
    # The promoted widget: "model" on frontend 1.43, "<inner node id>: model" on 1.35.
    ((widget, value),) = placed["widgets"]
    assert re.fullmatch(r"(\d+: )?model", widget) and value == _integration._test_workflows().models.DOWNLOAD_ENTRY
    assert placed["inner"] == ["DiffDISLoader", "DiffDISRemoveBackground"]
    library.click()  # close the library again

    # Wired and run: the test picture, the tiny model (through the promoted widget) at its size.
    page.evaluate("""(id) => {
        const graph = window.app.graph, blueprint = graph.getNodeById(id);
        const load = LiteGraph.createNode("LoadImage"), save = LiteGraph.createNode("SaveImage");
        load.pos = [blueprint.pos[0] - 400, blueprint.pos[1]];
        save.pos = [blueprint.pos[0] + 400, blueprint.pos[1]];
        graph.add(load);
        graph.add(save);
        load.widgets.find(w => w.name === "image").value = "diffdis_test.png";
        save.widgets.find(w => w.name === "filename_prefix").value = "DiffDIS/blueprint_browser";
        load.connect(0, blueprint, 0);
        blueprint.connect(0, save, 0);
        blueprint.widgets.find(w => /^(\\d+: )?model$/.test(w.name)).value = "tiny";
        for (const inner of blueprint.subgraph.nodes) {
            for (const widget of inner.widgets || []) if (widget.name === "processing_res") widget.value = 64;
        }
        window.app.canvas.setDirty(true, true);
    }""", placed["id"])
    before_run = set(comfyui.get("/history"))
    entry, started = press_run(page, comfyui, before_run)
    screenshot(page, "blueprint_after_run")
    prompt = entry["prompt"][2]
    loader = next(node for node in prompt.values() if node["class_type"] == "DiffDISLoader")
    assert loader["inputs"]["model"] == "tiny"  # the promoted widget's value reached the inner node
    save_id = next(i for i, node in prompt.items() if node["class_type"] == "SaveImage")
    (image,) = entry["outputs"][save_id]["images"]
    with Image.open(comfyui.base / "output" / image["subfolder"] / image["filename"]) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == IMAGE_SIZE
        alpha = np.asarray(cutout)[..., 3]
    assert alpha.max() > alpha.min()
    print(f"\n{BLUEPRINT} from the node library, run from the Run button in {time.monotonic() - started:.1f} s")
