"""The pack inside a real ComfyUI server (runs only when COMFYUI_PATH points to a ComfyUI checkout).

Run it against every ComfyUI the pack supports (0.8.0 and 0.21.0 were tried); tests of features a
ComfyUI lacks (core Remove Background before 0.21) are skipped there.

The server starts with ``--cpu`` on a free local port, from its own Python (``COMFYUI_PYTHON``,
default ``$COMFYUI_PATH/venv/bin/python``), with a temporary ``--base-directory``: the pack is
symlinked into its custom_nodes (under a name with a dash and a dot), the tiny model sits in its
models/diffdis (as ``tiny``, and as ``DiffDIS`` where the download entry looks), and a third copy in
a folder given by ``--extra-model-paths-config``. Nothing is written into the ComfyUI checkout, and
the server is always killed.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 240
PACK_FOLDER = "ComfyUI-DiffDIS.dev"
IMAGE_SIZE = (72, 48)  # width, height

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run")]


def _test_workflows():
    """tests/test_workflows.py, for its UI -> API conversion and core-widget table."""
    path = Path(__file__).with_name("test_workflows.py")
    spec = importlib.util.spec_from_file_location("diffdis_test_workflows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            pytest.fail(f"POST {path} -> {error.code}: {error.read().decode(errors='replace')[:3000]}")
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "diffdis-integration-test"})["prompt_id"]

    def wait(self, prompt_id: str, expect_success: bool = True) -> dict:
        """The prompt's history entry once it has ended; fail with the server's error if it failed."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if expect_success and status.get("status_str") != "success":
                    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    pytest.fail(f"prompt failed: {json.dumps(errors)[:3000]}\n--- server log ---\n{self.log_tail()}")
                return entry
            time.sleep(0.1)
        pytest.fail(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT_S} s\n{self.log_tail()}")

    def run_prompt(self, prompt: dict) -> dict:
        """Queue an API-format prompt and wait for its history entry; fail with the server's error."""
        return self.wait(self.queue(prompt))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_tiny(official_tiny: Path, target: Path) -> None:
    shutil.copytree(official_tiny, target, ignore=shutil.ignore_patterns("inputs.*", "expected.*", "README.md"))


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, official_tiny):
    comfy = Path(COMFYUI_PATH).resolve()
    python = Path(os.environ.get("COMFYUI_PYTHON") or comfy / "venv" / "bin" / "python")
    if not (comfy / "main.py").is_file() or not python.is_file():
        pytest.fail(f"COMFYUI_PATH={comfy} needs main.py and a Python at {python} (set COMFYUI_PYTHON)")
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    _copy_tiny(official_tiny, base / "models" / "diffdis" / "tiny")
    # Where the download entry looks first: complete, so it must be used without any download.
    _copy_tiny(official_tiny, base / "models" / "diffdis" / "DiffDIS")
    elsewhere = tmp_path_factory.mktemp("shared_models")
    _copy_tiny(official_tiny, elsewhere / "diffdis_models" / "tiny_extra")
    extra_config = base / "extra_model_paths.yaml"
    extra_config.write_text(f"diffdis_test:\n    base_path: {elsewhere}\n    diffdis: diffdis_models\n")
    (base / "input").mkdir()
    if (comfy / "input" / "example.png").is_file():  # what ComfyUI ships, and the workflows' Load Image names
        shutil.copy(comfy / "input" / "example.png", base / "input" / "example.png")
    width, height = IMAGE_SIZE
    picture = np.zeros((height, width, 4), np.uint8)
    picture[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    picture[12:36, 20:50, :3] = (230, 200, 40)
    picture[..., 3] = 255
    Image.fromarray(picture, "RGBA").save(base / "input" / "diffdis_test.png")

    port = _free_port()
    log = base / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFDIS_MODELS_DIR")}
    env["HF_HUB_OFFLINE"] = "1"  # the weights are on disk: nothing may be downloaded
    command = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--extra-model-paths-config", str(extra_config)]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", base, log)
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}\n{server.log_tail()}")
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s\n{server.log_tail()}")
            time.sleep(0.5)
        print(f"\nComfyUI up in {time.monotonic() - started:.1f} s on port {port}")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def test_the_pack_loads_and_lists_its_nodes(comfyui):
    log = comfyui.log.read_text(errors="replace")
    import_line = next((line for line in log.splitlines() if PACK_FOLDER in line and "seconds" in line), None)
    assert import_line is not None and "IMPORT FAILED" not in import_line, log[-4000:]
    print(f"\nimport time: {import_line.strip()}")

    info = comfyui.get("/object_info")
    workflows = _test_workflows()
    for node_id, cls in workflows.OUR_NODES.items():
        node, schema = info[node_id], cls.define_schema()
        assert node["display_name"] == schema.display_name
        assert node["category"] == "image/segmentation/DiffDIS" and node["description"] == cls.DESCRIPTION
        # The offline tests' stand-in for comfy_api.latest (tests/comfy_api_standin.py) gives the same
        # classic view of every node as the real API: inputs with all their options, outputs, tooltips.
        standin_view = json.loads(json.dumps(cls.INPUT_TYPES()))
        if node_id == "DiffDISLoader":  # the model folders differ: the server's models folder, not the tests'
            standin_view["required"]["model"][1]["options"] = node["input"]["required"]["model"][1]["options"]
        assert node["input"] == standin_view, node_id
        assert node["input_order"]["required"] == list(cls.INPUT_TYPES()["required"])
        assert node["output"] == cls.RETURN_TYPES and node["output_name"] == cls.RETURN_NAMES
        assert node["output_tooltips"] == cls.OUTPUT_TOOLTIPS
        if "search_aliases" in node:  # ComfyUI >= 0.21 hands them to the node search; 0.8's schema has none
            assert node["search_aliases"] == schema.search_aliases
    assert info["DiffDISLoader"]["output"] == ["DIFFDIS_MODEL", "BACKGROUND_REMOVAL"]
    models = info["DiffDISLoader"]["input"]["required"]["model"][1]["options"]
    # The diffdis folder from extra_model_paths.yaml (registered before custom nodes load, kept first),
    # then models/diffdis under --base-directory.
    assert models == ["tiny_extra", "DiffDIS", "tiny", workflows.models.DOWNLOAD_ENTRY]
    for core in ("LoadImage", "SaveImage", "MaskToImage", "PreviewImage", "ImageCompositeMasked"):
        assert core in info  # ComfyUI's own nodes module was not shadowed


def test_comfyui_serves_the_locales(comfyui):
    """locales/<lang>/nodeDefs.json, merged into what the frontend reads at /i18n."""
    translations = comfyui.get("/i18n")
    assert translations["zh"]["nodeDefs"]["DiffDISLoader"]["display_name"] == "加载 DiffDIS"
    assert translations["en"]["nodeDefs"]["DiffDISApplyAlpha"]["outputs"]["2"]["name"] == "rgb"


def test_example_workflows_match_comfyuis_node_definitions(comfyui):
    """Widget values of both UI workflows, read with the real node definitions, give the API twins."""
    info = comfyui.get("/object_info")
    workflows = _test_workflows()
    for class_type, widgets in workflows.CORE_WIDGETS.items():
        assert workflows.widgets_from_input_types(info[class_type]["input"]) == widgets, class_type

    def real_widget_names(class_type):
        return workflows.widgets_from_input_types(info[class_type]["input"]) if class_type in info else None

    for name in workflows.NAMES:
        assert workflows.ui_to_api(workflows.load(name), real_widget_names) == \
            workflows.comparable(workflows.load(name, api=True))


def _cutout_prompt(model: str, seed: int, workflow: str = "cutout", processing_res: int = 64) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / f"{workflow}.json").read_text(encoding="utf-8"))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "DiffDISLoader":
            inputs["model"] = model
        elif node["class_type"] in ("DiffDISEncodeCondition", "DiffDISRemoveBackground", "DiffDISApplyAlpha"):
            inputs["processing_res"] = processing_res  # Apply Alpha's: what the mask was predicted at
        elif node["class_type"] == "LoadImage":
            inputs["image"] = "diffdis_test.png"
        if "seed" in inputs:
            inputs["seed"] = seed
    return prompt


def _saved(server: Server, entry: dict, class_type: str = "SaveImage") -> Path:
    prompt = entry["prompt"][2]
    save_id = next(i for i, n in prompt.items() if n["class_type"] == class_type)
    (image,) = entry["outputs"][save_id]["images"]
    assert image["type"] == ("output" if class_type == "SaveImage" else "temp")
    return server.base / image["type"] / image["subfolder"] / image["filename"]


def _saved_cutout(server: Server, entry: dict) -> Path:
    return _saved(server, entry)


def test_cutout_workflow_saves_an_rgba_png_at_the_input_size(comfyui):
    started = time.monotonic()
    entry = comfyui.run_prompt(_cutout_prompt("tiny", seed=0))
    print(f"\ncutout workflow ran in {time.monotonic() - started:.1f} s")
    path = _saved_cutout(comfyui, entry)
    with Image.open(path) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == IMAGE_SIZE
        alpha = np.asarray(cutout)[..., 3]
    assert alpha.max() > alpha.min()  # a mask, not a constant
    preview_ids = [i for i, n in entry["prompt"][2].items() if n["class_type"] == "PreviewImage"]
    assert all(entry["outputs"][i]["images"] for i in preview_ids) and len(preview_ids) == 1
    print(f"saved {path.relative_to(comfyui.base)}: {cutout.mode} {cutout.size[0]}x{cutout.size[1]}")


def test_unload_models_then_run_again_from_the_extra_models_folder(comfyui):
    comfyui.post("/free", {"unload_models": True, "free_memory": True})
    entry = comfyui.run_prompt(_cutout_prompt("tiny_extra", seed=1))
    with Image.open(_saved_cutout(comfyui, entry)) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == IMAGE_SIZE
    log = comfyui.log.read_text(errors="replace")
    managed = [line for line in log.splitlines() if "DiffDISModules" in line or "loaded completely" in line]
    assert len([line for line in managed if "Requested to load DiffDISModules" in line]) >= 2, log[-4000:]
    print("\n" + "\n".join(managed))  # loaded through ComfyUI's model management, again after the unload


def test_the_download_entry_uses_the_folder_on_disk_offline(comfyui):
    """The workflow's own model value (the download entry) with HF_HUB_OFFLINE=1: the complete
    models/diffdis/DiffDIS folder is loaded and nothing is fetched."""
    prompt = _cutout_prompt(_test_workflows().models.DOWNLOAD_ENTRY, seed=2)
    entry = comfyui.run_prompt(prompt)
    with Image.open(_saved_cutout(comfyui, entry)) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == IMAGE_SIZE


def test_a_graph_saved_before_the_new_options_still_runs(comfyui):
    """The API cutout graph the pack shipped before Load DiffDIS's second output, Decode's decode option
    and Apply Alpha's refinements (no values for them: the defaults; decode auto gives the edge it uses)."""
    prompt = json.loads((ROOT / "tests" / "fixtures" / "saved_workflows" / "cutout_api.json").read_text())
    prompt["1"]["inputs"]["image"] = "diffdis_test.png"
    prompt["2"]["inputs"]["model"] = "tiny"
    prompt["3"]["inputs"]["processing_res"] = 64
    entry = comfyui.run_prompt(prompt)
    with Image.open(_saved_cutout(comfyui, entry)) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == IMAGE_SIZE
    assert _image(comfyui, entry, "11").max() > 0  # it previews the edge: decode (auto) decoded it


@pytest.mark.parametrize("name", ["cutout", "remove_background"])
def test_api_graphs_saved_before_the_v3_schema_still_run(comfyui, name):
    """The API twins the pack shipped on the classic node API run unchanged (but for the tiny model and
    test picture): RGBA cutouts at the input size."""
    prompt = json.loads((ROOT / "tests" / "fixtures" / "saved_workflows" / "before_v3" / "api" / f"{name}.json")
                        .read_text(encoding="utf-8"))
    for node in prompt.values():
        if node["class_type"] == "DiffDISLoader":
            node["inputs"]["model"] = "tiny"
        elif node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "diffdis_test.png"
        if "processing_res" in node["inputs"]:
            node["inputs"]["processing_res"] = 64
    entry = comfyui.run_prompt(prompt)
    with Image.open(_saved_cutout(comfyui, entry)) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == IMAGE_SIZE


def test_the_rgb_output_is_an_rgb_image(comfyui):
    """Apply Alpha's and Remove Background's third output: RGB, for the nodes that drop alpha."""
    prompt = _cutout_prompt("tiny", seed=0)
    apply_id = next(i for i, n in prompt.items() if n["class_type"] == "DiffDISApplyAlpha")
    prompt["40"] = {"class_type": "SaveImage", "inputs": {"images": [apply_id, 2], "filename_prefix": "DiffDIS/rgb"}}
    del prompt[next(i for i, n in prompt.items() if n["class_type"] == "SaveImage" and i != "40")]
    entry = comfyui.run_prompt(prompt)
    with Image.open(_saved(comfyui, entry)) as rgb:
        assert rgb.mode == "RGB" and rgb.size == IMAGE_SIZE


# An out-of-range or unknown value per node: (node class, input, value, ComfyUI's error type).
REFUSED = [("DiffDISOneStepSegment", "ensemble", 0, "value_smaller_than_min"),
           ("DiffDISOneStepSegment", "seed", -1, "value_smaller_than_min"),
           ("DiffDISEncodeCondition", "processing_res", 8192, "value_bigger_than_max"),
           ("DiffDISApplyAlpha", "mask_blur", 300, "value_bigger_than_max"),
           ("DiffDISApplyAlpha", "threshold", 1.5, "value_bigger_than_max"),
           ("DiffDISApplyAlpha", "background", "blue", "value_not_in_list"),
           ("DiffDISDecode", "decode", "edge", "value_not_in_list"),
           ("DiffDISLoader", "precision", "fp8", "value_not_in_list")]


def test_comfyui_refuses_values_outside_the_schema_naming_the_node(comfyui):
    """Ranges and choices are declared once, in the schema: ComfyUI's validation refuses the prompt before
    anything runs, with the node (id and type) and the input in its error."""
    for class_type, name, value, error_type in REFUSED:
        prompt = _cutout_prompt("tiny", seed=0)
        node_id = next(i for i, n in prompt.items() if n["class_type"] == class_type)
        prompt[node_id]["inputs"][name] = value
        request = urllib.request.Request(comfyui.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        errors = json.loads(refused.value.read())["node_errors"]
        assert errors[node_id]["class_type"] == class_type, errors
        (error,) = errors[node_id]["errors"]
        assert error["type"] == error_type and error["extra_info"]["input_name"] == name, error


def _image(server: Server, entry: dict, node_id: str) -> np.ndarray:
    (image,) = entry["outputs"][node_id]["images"]
    with Image.open(server.base / image["type"] / image["subfolder"] / image["filename"]) as picture:
        return np.asarray(picture.convert("L"))


def test_decode_auto_follows_the_edge_output_across_cached_runs(comfyui):
    """cutout.json decodes the mask only (its edge output is not linked); the same graph with the edge
    linked to a preview gets the edge, although Decode's own inputs did not change: ComfyUI would
    otherwise serve Decode's cached outputs (empty edge) from the first run."""
    prompt = _cutout_prompt("tiny", seed=5)
    decode_id = next(i for i, n in prompt.items() if n["class_type"] == "DiffDISDecode")
    assert prompt[decode_id]["inputs"]["decode"] == "auto"
    comfyui.run_prompt(prompt)
    linked = _cutout_prompt("tiny", seed=5)
    linked["30"] = {"class_type": "MaskToImage", "inputs": {"mask": [decode_id, 1]}}
    linked["31"] = {"class_type": "PreviewImage", "inputs": {"images": ["30", 0]}}
    entry = comfyui.run_prompt(linked)
    assert entry["prompt"][2][decode_id]["inputs"]["edge_output_linked"] is True  # the pack's on-prompt handler
    assert _image(comfyui, entry, "31").max() > 0  # decoded, not the cached empty edge
    unlinked = comfyui.run_prompt(_cutout_prompt("tiny", seed=5))
    assert unlinked["prompt"][2][decode_id]["inputs"]["edge_output_linked"] is False


def test_the_one_node_cutout_gives_the_staged_cutout(comfyui):
    """Same settings, same cutout (at a processing size above the picture's: on larger pictures the one node
    refines the edges from the processing-size mask, which the staged graph's MASK no longer is)."""
    staged = comfyui.run_prompt(_cutout_prompt("tiny", seed=3, processing_res=128))
    started = time.monotonic()
    one_node = comfyui.run_prompt(_cutout_prompt("tiny", seed=3, workflow="remove_background", processing_res=128))
    print(f"\nremove_background workflow ran in {time.monotonic() - started:.1f} s")
    with Image.open(_saved_cutout(comfyui, staged)) as a, Image.open(_saved_cutout(comfyui, one_node)) as b:
        assert b.mode == "RGBA" and b.size == IMAGE_SIZE
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_core_remove_background_runs_diffdis(comfyui):
    """ComfyUI's own Remove Background node (0.21 and newer) with Load DiffDIS's BACKGROUND_REMOVAL
    output gives the mask DiffDIS Remove Background gives at the same (trained) settings."""
    info = comfyui.get("/object_info")
    if "RemoveBackground" not in info:
        pytest.skip("this ComfyUI has no core Remove Background node (added in 0.21)")
    assert info["RemoveBackground"]["input"]["required"]["bg_removal_model"][0] == "BACKGROUND_REMOVAL"
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "diffdis_test.png"}},
        "2": {"class_type": "DiffDISLoader", "inputs": {"model": "tiny", "precision": "fp32", "device": "auto"}},
        "3": {"class_type": "RemoveBackground", "inputs": {"image": ["1", 0], "bg_removal_model": ["2", 1]}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "DiffDIS/core_mask"}},
        "6": {"class_type": "DiffDISRemoveBackground",
              "inputs": {"model": ["2", 0], "image": ["1", 0], "processing_res": 1024, "seed": 0, "tta": False,
                         "background": "alpha", "custom_color": "#000000"}},
        "7": {"class_type": "MaskToImage", "inputs": {"mask": ["6", 1]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "DiffDIS/node_mask"}},
    }
    started = time.monotonic()
    entry = comfyui.run_prompt(prompt)
    print(f"\ncore Remove Background + DiffDIS Remove Background at 1024 ran in {time.monotonic() - started:.1f} s")
    saved = {}
    for node_id in ("5", "8"):
        (image,) = entry["outputs"][node_id]["images"]
        with Image.open(comfyui.base / "output" / image["subfolder"] / image["filename"]) as picture:
            saved[node_id] = np.asarray(picture.convert("L"), dtype=np.int16)
    assert saved["5"].shape == (IMAGE_SIZE[1], IMAGE_SIZE[0])
    assert np.abs(saved["5"] - saved["8"]).max() <= 1 and saved["5"].max() > saved["5"].min()


def test_cancel_stops_a_long_batch_inside_the_model(comfyui):
    """Cancel (POST /interrupt) during a 16-frame batch at 1024: the prompt ends interrupted, without
    running the batch to the end. The latency on the full-size model is in benchmarks/comfyui_cancel.py."""
    prompt = _cutout_prompt("tiny", seed=0, workflow="remove_background", processing_res=1024)
    load_image = next(i for i, n in prompt.items() if n["class_type"] == "LoadImage")
    prompt["20"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [load_image, 0], "amount": 16}}
    rb = next(i for i, n in prompt.items() if n["class_type"] == "DiffDISRemoveBackground")
    prompt[rb]["inputs"]["image"] = ["20", 0]
    prompt_id = comfyui.queue(prompt)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(item[1] == prompt_id for item in comfyui.get("/queue")["queue_running"]):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(3.0)  # into the batch (the model is loaded within a second or two)
    pressed = time.monotonic()
    comfyui.post("/interrupt", {})
    entry = comfyui.wait(prompt_id, expect_success=False)
    latency = time.monotonic() - pressed
    print(f"\nCancel took {latency:.2f} s to stop the prompt (tiny model, 16 frames at 1024²)")
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]


def _test_packaging():
    """tests/test_packaging.py, for the blueprint's UI -> API conversion."""
    path = Path(__file__).with_name("test_packaging.py")
    spec = importlib.util.spec_from_file_location("diffdis_test_packaging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blueprints() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "subgraphs").glob("*.json"))}


def test_the_blueprint_is_listed_by_global_subgraphs(comfyui):
    """ComfyUI lists <pack>/subgraphs/*.json at /global_subgraphs (what the frontend's node library
    loads), under the pack's folder name, and serves each file as shipped."""
    listed = comfyui.get("/global_subgraphs")
    ours = {key: entry for key, entry in listed.items() if entry["info"]["node_pack"] == f"custom_nodes.{PACK_FOLDER}"}
    blueprints = _blueprints()
    assert sorted(entry["name"] for entry in ours.values()) == sorted(blueprints) == ["Remove Background (DiffDIS)"]
    for key, entry in ours.items():
        assert entry["source"] == "custom_node" and "path" not in entry  # no server path leaks
        served = comfyui.get(f"/global_subgraphs/{key}")
        assert json.loads(served["data"]) == blueprints[entry["name"]]
    print(f"\n/global_subgraphs: {len(listed)} entries, ours: {sorted(e['name'] for e in ours.values())}")


def test_the_blueprint_matches_comfyuis_node_definitions_and_runs(comfyui):
    """The blueprint's inner nodes read with the server's own definitions (widget counts, choices), then
    its graph as the frontend sends it, on the test picture: an RGBA cutout whose alpha is the mask."""
    info = comfyui.get("/object_info")
    workflows, packaging = _test_workflows(), _test_packaging()

    def real_widget_names(class_type):
        return workflows.widgets_from_input_types(info[class_type]["input"])

    (blueprint,) = _blueprints().values()
    definition = packaging.the_subgraph(blueprint)
    for node in definition["nodes"]:
        assert len(node["widgets_values"]) == len(real_widget_names(node["type"])), node["type"]
    prompt, outputs = packaging.blueprint_to_api(definition, image_node="100", widget_names=real_widget_names)
    loader = next(node for node in prompt.values() if node["class_type"] == "DiffDISLoader")
    model_input = info["DiffDISLoader"]["input"]["required"]["model"]  # [choices, ...] or V3's ["COMBO", {options}]
    choices = model_input[0] if isinstance(model_input[0], list) else model_input[1]["options"]
    assert loader["inputs"]["model"] in choices
    loader["inputs"]["model"] = "tiny"
    for node in prompt.values():
        if "processing_res" in node["inputs"]:
            node["inputs"]["processing_res"] = 64
    prompt["100"] = {"class_type": "LoadImage", "inputs": {"image": "diffdis_test.png"}}
    prompt["101"] = {"class_type": "SaveImage", "inputs": {"images": outputs["cutout"],
                                                           "filename_prefix": "DiffDIS/blueprint_cutout"}}
    prompt["102"] = {"class_type": "MaskToImage", "inputs": {"mask": outputs["mask"]}}
    prompt["103"] = {"class_type": "SaveImage", "inputs": {"images": ["102", 0],
                                                           "filename_prefix": "DiffDIS/blueprint_mask"}}
    entry = comfyui.run_prompt(prompt)
    saved = {}
    for node_id in ("101", "103"):
        (image,) = entry["outputs"][node_id]["images"]
        with Image.open(comfyui.base / "output" / image["subfolder"] / image["filename"]) as picture:
            saved[node_id] = (picture.mode, picture.size, np.asarray(picture))
    mode, size, cutout = saved["101"]
    assert mode == "RGBA" and size == IMAGE_SIZE
    np.testing.assert_array_equal(cutout[..., 3], saved["103"][2][..., 0])  # the mask is the cutout's alpha
    assert cutout[..., 3].max() > cutout[..., 3].min()
