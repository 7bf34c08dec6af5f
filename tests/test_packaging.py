"""What the pack ships besides its code: the subgraph blueprint (subgraphs/*.json, which ComfyUI lists at
/global_subgraphs for the node library), the template thumbnails, the icon, the Registry metadata in
pyproject.toml and the licence statements.

The blueprint is checked against the pack's own node definitions (imported as ComfyUI imports the
pack, through tests/test_workflows.py) and its inner graph is run on the tiny fixture model.
"""

import ast
import importlib.util
import io
import json
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SUBGRAPHS = ROOT / "subgraphs"
BLUEPRINT = SUBGRAPHS / "Remove Background (DiffDIS).json"
INPUT_NODE, OUTPUT_NODE = -10, -20  # the ids LiteGraph gives a subgraph's input and output nodes


def _test_workflows():
    """tests/test_workflows.py: the pack as ComfyUI imports it, its widget rules and the graph runner."""
    path = Path(__file__).with_name("test_workflows.py")
    spec = importlib.util.spec_from_file_location("diffdis_test_workflows_for_packaging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workflows = _test_workflows()
comfy_dirs = workflows.comfy_dirs  # models/input/output folders like ComfyUI's, no ComfyUI importable


def load_blueprint(path: Path = BLUEPRINT) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def the_subgraph(blueprint: dict) -> dict:
    (definition,) = blueprint["definitions"]["subgraphs"]
    return definition


# ---------------------------------------------------------------------------- the blueprint
def test_the_pack_ships_one_blueprint_named_after_its_subgraph():
    assert sorted(p.name for p in SUBGRAPHS.iterdir()) == [BLUEPRINT.name]
    blueprint = load_blueprint()
    definition = the_subgraph(blueprint)
    # The node library shows the file name (ComfyUI's subgraph_manager), the canvas the subgraph's name.
    assert definition["name"] == BLUEPRINT.stem == "Remove Background (DiffDIS)"
    assert definition["description"] and definition["category"] == \
        "Image generation and editing/Background Removal"  # beside core's Remove Background (BiRefNet)
    (outer,) = blueprint["nodes"]
    assert outer["type"] == definition["id"] and outer["title"] == definition["name"]
    assert blueprint["links"] == [] and blueprint["version"] == 0.4
    # What frontend 1.43's node library shows and searches (without them: "User generated subgraph blueprint").
    assert blueprint["extra"]["BlueprintDescription"] == definition["description"]
    schema = workflows.sys.modules[workflows.PACK.__name__ + ".nodes.schema"]
    assert set(schema.SEARCH_ALIASES) <= set(blueprint["extra"]["BlueprintSearchAliases"])


def test_blueprint_takes_an_image_and_gives_the_cutout_and_its_mask():
    blueprint = load_blueprint()
    definition = the_subgraph(blueprint)
    assert [(i["name"], i["type"]) for i in definition["inputs"]] == [("image", "IMAGE"), ("model", "COMBO")]
    assert [(o["name"], o["type"]) for o in definition["outputs"]] == [("cutout", "IMAGE"), ("mask", "MASK")]
    (outer,) = blueprint["nodes"]
    assert [(i["name"], i["type"]) for i in outer["inputs"]] == [(i["name"], i["type"]) for i in definition["inputs"]]
    assert [(o["name"], o["type"]) for o in outer["outputs"]] == \
        [(o["name"], o["type"]) for o in definition["outputs"]]
    nodes = {node["id"]: node for node in definition["nodes"]}
    links = {link["id"]: link for link in definition["links"]}
    # The cutout is Remove Background's image with background "alpha" (RGBA), the mask its mask output.
    (cutout_link,) = definition["outputs"][0]["linkIds"]
    (mask_link,) = definition["outputs"][1]["linkIds"]
    remove = nodes[links[cutout_link]["origin_id"]]
    assert remove["type"] == "DiffDISRemoveBackground" and links[cutout_link]["origin_slot"] == 0
    assert (links[mask_link]["origin_id"], links[mask_link]["origin_slot"]) == (remove["id"], 1)
    widgets = dict(zip(workflows.our_widgets("DiffDISRemoveBackground"), remove["widgets_values"], strict=True))
    assert widgets["background"] == "alpha"
    assert widgets["processing_res"] == workflows.segmentation.spec.DEFAULT_PROCESSING_RES  # as trained


def test_blueprint_promotes_the_model_choice_as_a_widget():
    blueprint = load_blueprint()
    definition = the_subgraph(blueprint)
    nodes = {node["id"]: node for node in definition["nodes"]}
    links = {link["id"]: link for link in definition["links"]}
    (model_link,) = definition["inputs"][1]["linkIds"]
    loader = nodes[links[model_link]["target_id"]]
    assert loader["type"] == "DiffDISLoader"
    socket = loader["inputs"][links[model_link]["target_slot"]]
    assert socket["name"] == "model" and socket["widget"] == {"name": "model"} and socket["link"] == model_link
    (outer,) = blueprint["nodes"]
    assert outer["properties"]["proxyWidgets"] == [[str(loader["id"]), "model"]]
    assert outer["inputs"][1]["widget"] == {"name": "model"}
    # A fresh install has only the download entry; it is what the blueprint starts with.
    assert loader["widgets_values"][0] == workflows.models.DOWNLOAD_ENTRY
    (entry,) = loader["properties"]["models"]
    assert entry == {"name": "DiffDIS", "url": "https://huggingface.co/qianyu1217/diffdis", "directory": "diffdis"}


def test_blueprint_nodes_and_widgets_match_the_node_definitions():
    definition = the_subgraph(load_blueprint())
    for node in definition["nodes"]:
        cls = workflows.OUR_NODES[node["type"]]
        inputs = workflows.all_inputs(cls)
        names = workflows.our_widgets(node["type"])
        assert len(node["widgets_values"]) == len(names), node["type"]
        for name, value in zip(names, node["widgets_values"], strict=True):
            if name.startswith("["):
                continue  # UI-only (the seed's control_after_generate)
            kind, options = inputs[name][0], inputs[name][1]
            if isinstance(kind, list):
                assert value in kind, (node["type"], name, value)
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], (node["type"], name, value)
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), (node["type"], name, value)
        for socket in node["inputs"]:
            kind = inputs[socket["name"]][0]
            assert socket["type"] == ("COMBO" if isinstance(kind, list) else kind), (node["type"], socket)
            assert ("widget" in socket) == (socket["name"] in names), (node["type"], socket)
        non_widget_inputs = [name for name in inputs if name not in names]
        assert [s["name"] for s in node["inputs"] if "widget" not in s] == non_widget_inputs, node["type"]
        # Outputs in the node's order; a later version may append more (the V3 migration may).
        declared = list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES, strict=True))
        assert [(o["name"], o["type"]) for o in node["outputs"]] == declared[:len(node["outputs"])]
        assert node["properties"]["Node name for S&R"] == node["type"]


def test_blueprint_links_are_consistent():
    definition = the_subgraph(load_blueprint())
    nodes = {node["id"]: node for node in definition["nodes"]}
    links = {link["id"]: link for link in definition["links"]}
    assert len(links) == len(definition["links"])
    state = definition["state"]
    assert state["lastNodeId"] >= max(nodes) and state["lastLinkId"] >= max(links)
    for link in links.values():
        if link["origin_id"] == INPUT_NODE:
            source = definition["inputs"][link["origin_slot"]]
            assert link["id"] in source["linkIds"]
        else:
            source = nodes[link["origin_id"]]["outputs"][link["origin_slot"]]
            assert link["id"] in source["links"]
        if link["target_id"] == OUTPUT_NODE:
            target = definition["outputs"][link["target_slot"]]
            assert target["linkIds"] == [link["id"]]
        else:
            target = nodes[link["target_id"]]["inputs"][link["target_slot"]]
            assert target["link"] == link["id"]
        assert source["type"] == target["type"] == link["type"], link
    # Every reference to a link is to one that exists, and every input of every node is connected.
    referenced = [i for io in definition["inputs"] + definition["outputs"] for i in io["linkIds"]]
    for node in nodes.values():
        referenced += [s["link"] for s in node["inputs"] if s["link"] is not None]
        referenced += [i for o in node["outputs"] for i in (o["links"] or [])]
        required = workflows.OUR_NODES[node["type"]].INPUT_TYPES()["required"]
        widgets = workflows.our_widgets(node["type"])
        assert all(any(s["name"] == name and s["link"] is not None for s in node["inputs"])
                   for name in required if name not in widgets), node["type"]
    assert set(referenced) == set(links)


def blueprint_to_api(definition: dict, image_node: str, widget_names=None) -> tuple[dict, dict]:
    """The prompt ComfyUI's frontend sends for the blueprint placed on a canvas: its inner nodes with
    their widget values (a promoted widget keeps the inner node's value), the subgraph's image input
    taken from ``image_node``. Also where each subgraph output comes from, as [node id, slot].
    ``widget_names(node type)``: the pack's own definitions unless given (a server's /object_info)."""
    widget_names = widget_names or workflows.our_widgets
    links = {link["id"]: link for link in definition["links"]}
    prompt = {}
    for node in definition["nodes"]:
        names = widget_names(node["type"])
        inputs = {name: value for name, value in zip(names, node["widgets_values"], strict=True)
                  if not name.startswith("[")}
        for socket in node["inputs"]:
            link = links.get(socket["link"])
            if link is None or "widget" in socket:
                continue
            if link["origin_id"] == INPUT_NODE:
                assert definition["inputs"][link["origin_slot"]]["type"] == "IMAGE"
                inputs[socket["name"]] = [image_node, 0]
            else:
                inputs[socket["name"]] = [str(link["origin_id"]), link["origin_slot"]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    outputs = {}
    for output in definition["outputs"]:
        (link_id,) = output["linkIds"]
        outputs[output["name"]] = [str(links[link_id]["origin_id"]), links[link_id]["origin_slot"]]
    return prompt, outputs


def test_blueprint_graph_cuts_out_an_image_on_the_tiny_model(comfy_dirs):
    width, height = 56, 40
    picture = np.zeros((height, width, 3), np.uint8)
    picture[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    picture[8:32, 12:44] = (230, 200, 40)
    Image.fromarray(picture).save(comfy_dirs / "input" / "test.png")
    prompt, outputs = blueprint_to_api(the_subgraph(load_blueprint()), image_node="100")
    assert "100" not in prompt
    prompt["100"] = {"class_type": "LoadImage", "inputs": {"image": "test.png"}}
    workflows.for_tiny_model(prompt)

    results = workflows.execute(prompt, workflows.CORE_STUBS)

    cutout = results[outputs["cutout"][0]][outputs["cutout"][1]]
    mask = results[outputs["mask"][0]][outputs["mask"][1]]
    assert cutout.shape == (1, height, width, 4) and mask.shape == (1, height, width)
    torch.testing.assert_close(cutout[..., 3], mask)  # straight alpha: the mask is the cutout's alpha
    assert mask.max() > mask.min()


# ---------------------------------------------------------------------------- Registry metadata
# The rules of the Comfy Registry's pyproject.toml specification (docs.comfy.org/registry/specifications)
# and of what `comfy node validate` (comfy-cli) checks, without comfy-cli: .ci/run also runs it when it can.
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
# comfy-cli's pattern for requires-comfyui: comma-separated [operator]major.minor.patch[-suffix]
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
ICON = ROOT / "docs" / "images" / "icon.png"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_project_name_version_and_description_follow_the_registry_rules(pyproject):
    project = pyproject["project"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z0-9._-]+", name) and name[0].isalpha()
    assert not re.search(r"[._-]{2}", name)  # no consecutive special characters
    assert SEMVER.match(project["version"])
    assert project["description"] and project["requires-python"]


def test_licence_is_declared_in_a_form_the_registry_reads(pyproject):
    licence = pyproject["project"]["license"]
    # An SPDX expression (PEP 639; comfy-cli reads a string as the licence's text) with its file, or the
    # Registry's documented tables.
    if isinstance(licence, str):
        assert licence == "MIT" and pyproject["project"]["license-files"] == ["LICENSE"]
    else:
        assert set(licence) <= {"file", "text"} and any(licence.values())
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


def test_classifiers_are_ones_the_registry_understands(pyproject):
    classifiers = pyproject["project"].get("classifiers", [])
    for classifier in classifiers:
        if classifier.startswith("Operating System :: "):
            assert classifier.removeprefix("Operating System :: ").startswith(OS_PREFIXES), classifier
        if classifier.startswith("Environment ::"):
            assert classifier.removeprefix("Environment :: ") in ACCELERATORS, classifier


def test_dependencies_are_the_requirements(pyproject):
    """The Registry lists pyproject's dependencies; ComfyUI-Manager installs requirements.txt."""
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert pyproject["project"]["dependencies"] == requirements


def oldest_comfyui_tried() -> str:
    """The oldest version named in the integration test's "(... were tried)" note."""
    text = (ROOT / "tests" / "test_comfyui_integration.py").read_text(encoding="utf-8")
    (tried,) = re.findall(r"\(([^()]*) were tried\)", text)
    versions = re.findall(r"\d+\.\d+\.\d+", tried)
    assert versions, tried
    return min(versions, key=lambda v: tuple(int(part) for part in v.split(".")))


def test_tool_comfy_section(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]) and comfy["DisplayName"]
    requirement = comfy["requires-comfyui"]
    assert all(VERSION_PART.match(part.strip()) for part in requirement.split(","))
    assert requirement == f">={oldest_comfyui_tried()}"  # what the pack has actually run in
    # includes adds untracked folders to the Registry's archive; each must exist.
    assert all((ROOT / entry).exists() for entry in comfy["includes"])
    # The icon is a URL; the file it points to is docs/images/icon.png in the public repository, so
    # it is set together with that repository's address.
    repository = pyproject["project"].get("urls", {}).get("Repository", "")
    if repository or comfy["Icon"]:
        assert repository.startswith("https://github.com/"), "set [project.urls] Repository with Icon"
        owner_and_name = repository.removeprefix("https://github.com/").removesuffix(".git")
        assert comfy["Icon"] == f"https://raw.githubusercontent.com/{owner_and_name}/main/docs/images/icon.png"


def test_icon_is_square_small_and_made_by_its_script():
    make_icon = _load_script("make_icon")
    with Image.open(ICON) as icon:
        assert icon.format == "PNG" and icon.size[0] == icon.size[1] <= 400
        committed = np.asarray(icon.convert("RGBA"), dtype=np.float32)
    drawn = np.asarray(make_icon.make_icon().convert("RGBA"), dtype=np.float32)
    assert drawn.shape == committed.shape
    assert np.abs(drawn - committed).mean() < 1.0  # the same picture (resampling may differ by a level)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"diffdis_docs_{name}", ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_files() -> list[Path]:
    """The pack's Python files: everything but virtual environments and git's own folder."""
    def ours(path: Path) -> bool:
        return not any(part == ".git" or "venv" in part or part == "site-packages"
                       for part in path.relative_to(ROOT).parts)

    return sorted(path for path in ROOT.rglob("*.py") if ours(path))


def test_no_exec_eval_or_semicolon_statements():
    """comfy-cli's security check before publishing (ruff S102, S307, E702: "will soon be an error")."""
    offences = []
    for path in python_files():
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.id}()")
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string == ";":
                offences.append(f"{path.relative_to(ROOT)}:{token.start[0]}: statements separated by ';'")
    assert not offences, offences


# ---------------------------------------------------------------------------- pictures
TEMPLATE_NAMES = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def make_thumbnails():
    return _load_script("make_thumbnails")


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_thumbnail_is_the_drawn_illustration_of_its_template(make_thumbnails, name):
    """Each card is what docs/make_thumbnails.py draws from the template (square, marked as an
    illustration), not a screenshot of a run: a replaced or stale picture fails here."""
    with Image.open(ROOT / "workflows" / f"{name}.jpg") as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (make_thumbnails.SIZE,) * 2
        assert thumbnail.info.get("comment") == make_thumbnails.MARK.encode()
        committed = np.asarray(thumbnail.convert("RGB"), dtype=np.float32)
    drawn = np.asarray(make_thumbnails.make_thumbnail(name, make_thumbnails.display_names()), dtype=np.float32)
    assert np.abs(drawn - committed).mean() < 3.0  # JPEG and font rendering differ by a few levels at most


def test_thumbnail_panels_show_the_true_mask_of_the_drawn_picture(make_thumbnails):
    """The "mask" panel is the test picture's exact matte and the cutout is that picture under it:
    no model is involved."""
    from benchmarks.synthetic_composites import make_composite

    workflow = json.loads((ROOT / "workflows" / "remove_background.json").read_text(encoding="utf-8"))
    panels = dict(make_thumbnails.panels_for(workflow))
    height, width = make_thumbnails.PICTURE
    truth = make_composite(height, width, seed=0, noise=0.005)["alpha"][0, 0].numpy()
    mask = np.asarray(panels["mask"].convert("L"), dtype=np.float32) / 255
    assert np.abs(mask - truth).max() <= 1 / 255 + 1e-6


def test_readme_figures_exist_and_are_drawn_by_a_script_in_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert figures
    scripts = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("make_*.py"))
    for figure in figures:
        assert (ROOT / figure).is_file(), figure
        assert Path(figure).name in scripts, f"{figure}: no docs/make_*.py writes it"


# ---------------------------------------------------------------------------- licences
def test_readme_states_the_licences_of_the_code_the_weights_and_sd_turbo_with_sources():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Licence and credits", 1)[1].split("\n## ", 1)[0]
    assert "MIT licence (`LICENSE`)" in section
    for source in ("https://github.com/qianyu-dlut/DiffDIS/blob/main/LICENSE",
                   "https://huggingface.co/qianyu1217/diffdis",
                   "https://huggingface.co/stabilityai/sd-turbo/blob/main/LICENSE.md",
                   "https://stability.ai/use-policy"):
        assert f"]({source})" in section, source
    assert "Stability AI Community License" in section
