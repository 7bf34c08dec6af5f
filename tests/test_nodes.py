"""The ComfyUI nodes on the tiny fixture model, without ComfyUI (its services fall back, or tests
stand in for the parts of ComfyUI they need).

The pack is imported the way ComfyUI imports it: its root ``__init__.py`` by file path, under a
package name made from the folder's path, so everything inside must resolve relatively.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from tolerances import assert_close_across_kernels

from benchmarks.gpu_check import import_pack

ROOT = Path(__file__).resolve().parents[1]
NODE_IDS = ["DiffDISLoader", "DiffDISEncodeCondition", "DiffDISOneStepSegment", "DiffDISDecode", "DiffDISApplyAlpha",
            "DiffDISRemoveBackground"]
COMFY_MODULES = ["folder_paths", "comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils",
                 "comfy.cli_args"]
# What people type to find a background remover (issue 10): every DiffDIS node answers to each.
SEARCH_TERMS = ["remove background", "background removal", "rembg", "cutout", "matting", "segmentation", "alpha",
                "mask", "DIS"]
RES = 64  # the tiny model's processing resolution


def node_classes(pack: types.ModuleType) -> dict:
    """node id -> class, as ComfyUI registers a V3 pack: the node list of comfy_entrypoint's extension."""
    extension = asyncio.run(pack.comfy_entrypoint())
    return {cls.define_schema().node_id: cls for cls in asyncio.run(extension.get_node_list())}


PACK = import_pack("/opt/ComfyUI/custom_nodes/comfyui-diffdis copy")
NODES = node_classes(PACK)
services = sys.modules[PACK.__name__ + ".nodes.services"]
models = sys.modules[PACK.__name__ + ".nodes.models"]
batching = sys.modules[PACK.__name__ + ".nodes.batching"]
tensors = sys.modules[PACK.__name__ + ".nodes.tensors"]
segmentation = sys.modules[PACK.__name__ + ".nodes.segmentation"]
cutout = sys.modules[PACK.__name__ + ".nodes.cutout"]
refinement = sys.modules[PACK.__name__ + ".nodes.refinement"]


def copy_tiny(official_tiny: Path, target: Path) -> Path:
    shutil.copytree(official_tiny, target, ignore=shutil.ignore_patterns("inputs.*", "expected.*", "README.md"))
    return target


def run(node_id: str, prompt=None, unique_id=None, **kwargs) -> tuple:
    """A node's outputs for ``kwargs``, run as ComfyUI runs a V3 node: ``execute`` on a copy of its class
    that holds the values of the hidden inputs (the prompt, the node's id) when there are any."""
    cls = NODES[node_id]
    if prompt is not None or unique_id is not None:
        cls = type(cls.__name__, (cls,), {"hidden": types.SimpleNamespace(prompt=prompt, unique_id=unique_id)})
    return cls.execute(**kwargs).args


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is fastest on one thread, and immune to OpenMP spinning on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def without_comfyui(monkeypatch):
    """Make sure no ComfyUI module is importable, whatever the environment (tests add fakes)."""
    for name in COMFY_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, official_tiny) -> Path:
    root = tmp_path_factory.mktemp("models") / "diffdis"
    copy_tiny(official_tiny, root / "tiny")
    return root


@pytest.fixture(autouse=True)
def use_models_root(monkeypatch, models_root):
    monkeypatch.setenv(services.MODELS_DIR_ENV, str(models_root))


@pytest.fixture(scope="module")
def model(models_root):
    with pytest.MonkeyPatch.context() as patch:
        for name in COMFY_MODULES:
            patch.setitem(sys.modules, name, None)
        patch.setenv(services.MODELS_DIR_ENV, str(models_root))
        loaded, _ = run("DiffDISLoader", model="tiny", precision="fp32", device="cpu")
    return loaded


def images(batch=3, height=40, width=56, channels=3, seed=0) -> torch.Tensor:
    """A ComfyUI IMAGE batch: smooth shapes on a background, different per image."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height)[:, None]
    xs = torch.linspace(-1, 1, width)[None, :]
    out = []
    for i in range(batch):
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([0.6, 0.6, 0.4]) + torch.tensor([-0.3, -0.3, 0.3]))
        disc = (((ys - cy) ** 2 + (xs - cx) ** 2) < r ** 2).float()
        color = torch.rand(3, generator=g)
        img = disc[..., None] * color + (1 - disc[..., None]) * torch.tensor([0.2, 0.3, 0.25]) * (1 + 0.1 * i)
        out.append(img)
    rgb = torch.stack(out).clamp(0, 1)
    if channels == 4:
        rgb = torch.cat([rgb, torch.rand(batch, height, width, 1, generator=g)], dim=-1)
    return rgb


def segment(model, image, seed=0, ensemble=1, tta=False, normalize=True, res=RES, decode="mask and edge"):
    (cond,) = run("DiffDISEncodeCondition", model=model, image=image, processing_res=res)
    (latents,) = run("DiffDISOneStepSegment", model=model, cond=cond, seed=seed, ensemble=ensemble, tta=tta)
    return run("DiffDISDecode", model=model, latents=latents, normalize=normalize, decode=decode)


def error_message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "errors are shown on one line"
    return message


# ---------------------------------------------------------------------------- registration
def test_node_ids_display_names_and_ui_metadata():
    assert list(NODES) == NODE_IDS
    assert {node_id: cls.define_schema().display_name for node_id, cls in NODES.items()} == {
        "DiffDISLoader": "Load DiffDIS", "DiffDISEncodeCondition": "DiffDIS Encode Condition",
        "DiffDISOneStepSegment": "DiffDIS One-Step Segment", "DiffDISDecode": "DiffDIS Decode Mask/Edge",
        "DiffDISApplyAlpha": "DiffDIS Apply Alpha", "DiffDISRemoveBackground": "DiffDIS Remove Background"}
    for node_id, cls in NODES.items():
        assert cls.CATEGORY == "image/segmentation/DiffDIS"
        assert len(cls.DESCRIPTION) > 40
        assert callable(cls.execute)
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        assert all(cls.OUTPUT_TOOLTIPS), f"{node_id} has an output without a tooltip"
        inputs = cls.INPUT_TYPES()
        for name, (_, options) in {**inputs["required"], **inputs.get("optional", {})}.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        aliases = [alias.lower() for alias in cls.define_schema().search_aliases]
        assert {term.lower() for term in SEARCH_TERMS} <= set(aliases), node_id
        assert len(set(aliases)) == len(aliases) and all(isinstance(a, str) and a for a in aliases)
    segment_inputs = NODES["DiffDISOneStepSegment"].INPUT_TYPES()["required"]
    assert segment_inputs["seed"][1]["control_after_generate"] is True
    assert NODES["DiffDISDecode"].RETURN_TYPES == ["MASK", "MASK"]
    # Slot 0 is what saved workflows link to; slot 1 is ComfyUI's own type for its Remove Background node.
    assert NODES["DiffDISLoader"].RETURN_TYPES == ["DIFFDIS_MODEL", "BACKGROUND_REMOVAL"]
    # Slots 0 and 1 are what saved workflows link to; slot 2 is the always-RGB image (test_cutout_rgb_output).
    assert NODES["DiffDISRemoveBackground"].RETURN_TYPES == ["IMAGE", "MASK", "IMAGE"]
    assert NODES["DiffDISApplyAlpha"].RETURN_TYPES == ["IMAGE", "MASK", "IMAGE"]
    assert "JoinImageWithAlpha".lower() in NODES["DiffDISApplyAlpha"].INPUT_TYPES()["required"]["mask"][1][
        "tooltip"].replace(" ", "").lower()
    for node_id in ("DiffDISEncodeCondition", "DiffDISRemoveBackground"):
        processing_res = NODES[node_id].INPUT_TYPES()["required"]["processing_res"][1]
        assert (processing_res["default"], processing_res["step"]) == (1024, 64)


# (node, input): (min, max), and the choices of each combo: declared once, in the schema. ComfyUI refuses a
# value outside them before the node runs, naming the node (tests/test_comfyui_integration.py).
RANGES = {("DiffDISEncodeCondition", "processing_res"): (64, 4096), ("DiffDISOneStepSegment", "seed"): (0, 2**64 - 1),
          ("DiffDISOneStepSegment", "ensemble"): (1, 16), ("DiffDISApplyAlpha", "mask_blur"): (0, 256),
          ("DiffDISApplyAlpha", "mask_expand"): (-256, 256), ("DiffDISApplyAlpha", "threshold"): (0.0, 1.0),
          ("DiffDISApplyAlpha", "processing_res"): (64, 4096),
          ("DiffDISRemoveBackground", "processing_res"): (64, 4096),
          ("DiffDISRemoveBackground", "seed"): (0, 2**64 - 1)}
CHOICES = {("DiffDISLoader", "precision"): ["auto", "fp32", "fp16", "bf16"],
           ("DiffDISLoader", "device"): ["auto", "cpu"],
           ("DiffDISDecode", "decode"): ["auto", "mask only", "mask and edge"],
           ("DiffDISApplyAlpha", "background"): ["alpha", "white", "black", "gray", "green", "custom"],
           ("DiffDISRemoveBackground", "background"): ["alpha", "white", "black", "gray", "green", "custom"]}


def test_the_schema_declares_every_range_and_choice():
    declared_ranges, declared_choices = {}, {}
    for node_id, cls in NODES.items():
        for declared in cls.define_schema().inputs:
            if declared.io_type in ("INT", "FLOAT"):
                declared_ranges[node_id, declared.id] = (declared.min, declared.max)
                assert declared.min <= declared.default <= declared.max, (node_id, declared.id)
            elif declared.io_type == "COMBO" and (node_id, declared.id) != ("DiffDISLoader", "model"):  # the folders
                declared_choices[node_id, declared.id] = declared.options
                assert declared.default in declared.options, (node_id, declared.id)
    assert declared_ranges == RANGES
    assert declared_choices == CHOICES


LOCALES = ROOT / "locales"


def locale_entries(node_id: str) -> dict:
    """What a nodeDefs.json holds for a node (ComfyUI serves locales/<lang>/nodeDefs.json at /i18n): names
    and tooltips of its inputs, and of its outputs by slot."""
    schema = NODES[node_id].define_schema()
    return {"display_name": schema.display_name, "description": schema.description,
            "inputs": {i.id: {"name": i.id, "tooltip": i.tooltip} for i in schema.inputs},
            "outputs": {str(slot): {"name": o.display_name, "tooltip": o.tooltip}
                        for slot, o in enumerate(schema.outputs)}}


def test_locales_cover_every_node_input_and_output_and_nothing_else():
    """English is the schema's own text (stale when a tooltip changes); Chinese has the same keys, each
    translated (a name or tooltip left in English is missed, not translated)."""
    english = json.loads((LOCALES / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    assert english == {node_id: locale_entries(node_id) for node_id in NODES}, \
        "locales/en/nodeDefs.json differs from the schema: update it (and locales/zh) from the schema"
    chinese = json.loads((LOCALES / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    assert list(chinese) == list(english)
    for node_id, entry in english.items():
        translated = chinese[node_id]
        assert set(translated) == set(entry) and translated["display_name"] and translated["description"]
        for part in ("inputs", "outputs"):
            assert list(translated[part]) == list(entry[part]), (node_id, part)
            for key, text in translated[part].items():
                assert set(text) == {"name", "tooltip"} and text["tooltip"], (node_id, part, key)
                assert any("\u4e00" <= c <= "\u9fff" for c in text["tooltip"]), (node_id, part, key)
        assert any("\u4e00" <= c <= "\u9fff" for c in translated["description"]), node_id
    assert sorted(p.name for p in LOCALES.iterdir()) == ["en", "zh"]


def test_download_entry_and_sizes_come_from_the_core_spec():
    from diffdis_core import spec

    assert models.DOWNLOAD_REPO == spec.DEFAULT_MODEL and models.EMBED_FILE == spec.EMPTY_EMBED_FILE
    tooltip = NODES["DiffDISLoader"].INPUT_TYPES()["required"]["model"][1]["tooltip"]
    assert models.DOWNLOAD_SIZE in tooltip


def pack_import_script(body: str, with_comfy_api: bool = True) -> str:
    """A script that imports the pack as ComfyUI does (any folder name, ComfyUI's own ``nodes`` module and
    server loaded, the pack not on sys.path), then runs ``body`` with the module as ``pack``."""
    install = f"sys.path.insert(0, {str(ROOT / 'tests')!r}); import comfy_api_standin; comfy_api_standin.install()"
    # A ComfyUI without comfy_api.latest: its folder_paths module (what the pack asks to know it is in one).
    old_comfyui = 'sys.modules["folder_paths"] = types.ModuleType("folder_paths")'
    return textwrap.dedent(f"""
        import asyncio, importlib.util, logging, sys, types
        {install if with_comfy_api else old_comfyui}
        comfy_nodes = types.ModuleType("nodes")
        sys.modules["nodes"] = comfy_nodes
        handlers = []
        server = types.ModuleType("server")  # ComfyUI's, running before custom nodes load
        server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(
            on_prompt_handlers=handlers, add_on_prompt_handler=handlers.append))
        sys.modules["server"] = server
        name = "/srv/ComfyUI/custom_nodes/My DiffDIS-pack_x_v2"
        spec = importlib.util.spec_from_file_location(name, {str(ROOT / "__init__.py")!r})
        pack = importlib.util.module_from_spec(spec)
        sys.modules[name] = pack
        spec.loader.exec_module(pack)
    """) + textwrap.dedent(body)


def run_script(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_import_is_light_and_never_shadows_comfyuis_nodes_module(tmp_path):
    """Under any folder name, with ComfyUI's own ``nodes`` module loaded and the pack not on sys.path:
    no diffusers import, no model, ComfyUI's ``nodes`` untouched, the bundled core found; ComfyUI's call
    of comfy_entrypoint gives the six nodes and registers Decode's on-prompt handler."""
    result = run_script(pack_import_script(f"""
        assert sys.modules["nodes"] is comfy_nodes
        extension = asyncio.run(pack.comfy_entrypoint())
        node_ids = [cls.define_schema().node_id for cls in asyncio.run(extension.get_node_list())]
        assert node_ids == {NODE_IDS!r}, node_ids
        heavy = [m for m in ("diffusers", "transformers", "huggingface_hub", "safetensors", "diffdis_core.pipeline",
                             "diffdis_core.hub", "diffdis_core.unet") if m in sys.modules]
        assert not heavy, heavy
        import diffdis_core
        assert diffdis_core.__file__.startswith({str(ROOT)!r}), diffdis_core.__file__
        assert sys.modules["diffdis_core.spec"].__file__.startswith({str(ROOT)!r})
        assert [h.__name__ for h in handlers] == ["mark_edge_use"]
        print("ok")
    """), tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_comfyui_without_the_v3_api_is_refused_with_one_line(tmp_path):
    """A ComfyUI older than comfy_api.latest: the pack loads no node and says so in one log line naming the
    version it needs (ComfyUI loads a pack with an empty NODE_CLASS_MAPPINGS without a word of its own)."""
    result = run_script(pack_import_script("""
        assert pack.NODE_CLASS_MAPPINGS == {} and not hasattr(pack, "comfy_entrypoint")
        print("ok")
    """, with_comfy_api=False), tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DiffDIS needs ComfyUI 0.8.0 or newer" in lines[0], lines
    assert PACK.MINIMUM_COMFYUI == "0.8.0"


# ---------------------------------------------------------------------------- model folder
def test_model_list_shows_folders_of_every_root_then_the_download_entry(tmp_path, monkeypatch, official_tiny):
    first, second = tmp_path / "a", tmp_path / "b"
    copy_tiny(official_tiny, first / "tiny")
    (first / ".cache").mkdir()
    (first / "notes.txt").write_text("not a model")
    (second / "tiny").mkdir(parents=True)
    (second / "Other").mkdir()
    monkeypatch.setenv(services.MODELS_DIR_ENV, os.pathsep.join([str(first), str(second)]))
    choices = NODES["DiffDISLoader"].INPUT_TYPES()["required"]["model"][1]["options"]
    assert choices == ["tiny", "Other", models.DOWNLOAD_ENTRY]


def test_loader_loads_a_folder_on_the_cpu(model, models_root):
    assert isinstance(model, models.DiffDISModel)
    assert model.folder == models_root / "tiny"
    assert model.load_device.type == "cpu" and model.dtype == torch.float32
    assert model.patcher is None  # no ComfyUI here
    loaded, bg_model = run("DiffDISLoader", model="tiny", precision="fp32", device="cpu")
    assert isinstance(bg_model, cutout.DiffDISBackgroundRemoval) and bg_model.diffdis is loaded


def test_loader_precision_and_mixing_precisions(model):
    bf16, _ = run("DiffDISLoader", model="tiny", precision="bf16", device="auto")
    assert bf16.dtype == torch.bfloat16 and bf16.vae_dtype == torch.bfloat16
    fp16, _ = run("DiffDISLoader", model="tiny", precision="fp16", device="cpu")
    assert fp16.dtype == torch.float16
    (mask, edge) = segment(bf16, images(batch=1))
    assert mask.dtype == torch.float32 and mask.shape == (1, 40, 56)
    # A condition encoded by an fp32 model is cast for a bf16 one (two loaders in one graph).
    (cond,) = run("DiffDISEncodeCondition", model=model, image=images(batch=1), processing_res=RES)
    (latents,) = run("DiffDISOneStepSegment", model=bf16, cond=cond, seed=0, ensemble=1, tta=False)
    assert latents.views[0].mask_latents.dtype == torch.bfloat16
    mixed, _ = run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="mask only")
    torch.testing.assert_close(mixed, mask, atol=0.1, rtol=0)


@pytest.mark.parametrize("name, expected", [
    ("missing", "does not exist"),
    ("../tiny", "not a folder name"),
    ("..", "not a folder name"),
    ("/etc", "not a folder name"),
    ("sub/tiny", "not a folder name"),
    ("..\\tiny", "not a folder name"),
    ("C:\\models\\tiny", "not a folder name"),
    ("", "no model selected"),
])
def test_loader_rejects_bad_model_names(name, expected, models_root):
    from diffdis_core import DiffDISError

    with pytest.raises(DiffDISError) as excinfo:
        run("DiffDISLoader", model=name, precision="auto", device="auto")
    message = error_message(excinfo)
    assert expected in message
    if name == "missing":
        assert str(models_root / "missing") in message
        assert "missing/unet/" in message and "missing/vae/" in message and "empty_text_embed.safetensors" in message


def test_loader_names_what_an_incomplete_folder_lacks(tmp_path, monkeypatch, official_tiny):
    from diffdis_core import DiffDISError

    folder = copy_tiny(official_tiny, tmp_path / "half")
    shutil.rmtree(folder / "vae")
    (folder / "empty_text_embed.safetensors").unlink()
    monkeypatch.setenv(services.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(DiffDISError) as excinfo:
        run("DiffDISLoader", model="half", precision="auto", device="auto")
    message = error_message(excinfo)
    assert str(folder) in message and "incomplete" in message
    assert "vae/config.json" in message and "empty_text_embed.safetensors (or text_encoder" in message


def test_loader_names_a_truncated_unet(tmp_path, monkeypatch, official_tiny):
    """An interrupted 3.65 GB download: the parameter count for the precision choice reads the header first."""
    from diffdis_core import DiffDISError

    folder = copy_tiny(official_tiny, tmp_path / "cut")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    monkeypatch.setenv(services.MODELS_DIR_ENV, str(tmp_path))
    for load in (lambda: run("DiffDISLoader", model="cut", precision="auto", device="auto"),
                 lambda: models.unet_parameter_count(folder)):
        with pytest.raises(DiffDISError) as excinfo:
            load()
        assert error_message(excinfo).startswith(f"{weights} is truncated: {size // 2:,} of {size:,} bytes")


@pytest.mark.parametrize("part", ["", "vae", "unet/diffusion_pytorch_model.safetensors"])
def test_loader_names_an_unreadable_model_folder_or_file(shared_tmp_path, monkeypatch, official_tiny, denied_read,
                                                         part):
    from diffdis_core import DiffDISError

    folder = copy_tiny(official_tiny, shared_tmp_path / "private")
    monkeypatch.setenv(services.MODELS_DIR_ENV, str(shared_tmp_path))
    target = folder / part if part else folder
    with denied_read(target), pytest.raises(DiffDISError) as excinfo:
        run("DiffDISLoader", model="private", precision="fp32", device="cpu")
    message = error_message(excinfo)
    assert message.startswith(f"{target}: this account may not read it (permission denied)") and "chmod" in message


def test_every_layout_help_agrees_with_the_cores_layout_table():
    from diffdis_core import hub, spec

    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("A model folder")[1].split("```")[1]
    guide = (ROOT / "docs" / "comfyui.md").read_text(encoding="utf-8").split("└── DiffDIS/")[1].split("```")[0]
    for text in (models.tree_help("DiffDIS"), hub.LAYOUT_HELP, readme, guide):
        assert spec.EMPTY_EMBED_FILE in text
        for part, names in spec.MODEL_FOLDER_LAYOUT.items():
            assert part + "/" in text and all(name in text for name in names), (part, text)


@pytest.mark.parametrize("option, value", [("precision", "fp8"), ("device", "cuda:7")])
def test_loader_rejects_unknown_options(option, value):
    from diffdis_core import DiffDISError

    kwargs = {"model": "tiny", "precision": "auto", "device": "auto", option: value}
    with pytest.raises(DiffDISError, match=f"{option} '{value}' is not one of"):
        run("DiffDISLoader", **kwargs)


def test_missing_dependencies_say_how_to_install_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffdis_core", None)  # as if diffusers (or the core) failed to import
    with pytest.raises(RuntimeError) as excinfo:
        run("DiffDISLoader", model="tiny", precision="auto", device="auto")
    message = error_message(excinfo)
    assert message.startswith("DiffDIS could not import its dependencies (ModuleNotFoundError: ")
    assert f"{sys.executable} -m pip install -r {ROOT / 'requirements.txt'}" in message


def test_download_entry_uses_a_complete_folder_without_the_network(tmp_path, monkeypatch, official_tiny):
    from diffdis_core import hub

    copy_tiny(official_tiny, tmp_path / models.DOWNLOAD_FOLDER)
    monkeypatch.setenv(services.MODELS_DIR_ENV, str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although the model is on disk")

    monkeypatch.setattr(hub, "download", no_network)
    loaded, _ = run("DiffDISLoader", model=models.DOWNLOAD_ENTRY, precision="auto", device="cpu")
    assert loaded.folder == tmp_path / models.DOWNLOAD_FOLDER


def test_download_entry_downloads_into_the_models_folder(tmp_path, monkeypatch, official_tiny):
    from diffdis_core import hub

    monkeypatch.setenv(services.MODELS_DIR_ENV, str(tmp_path))
    calls = []

    def fake_snapshot(repo, patterns, local_dir=None, **kwargs):
        # What huggingface-hub would leave: the released layout (here: text encoder missing, embedding present).
        calls.append((repo, list(patterns), Path(local_dir)))
        copy_tiny(official_tiny, Path(local_dir) / "copy")
        for item in (Path(local_dir) / "copy").iterdir():
            shutil.move(str(item), str(Path(local_dir) / item.name))
        (Path(local_dir) / "copy").rmdir()
        return Path(local_dir)

    monkeypatch.setattr(hub, "download", fake_snapshot)
    loaded, _ = run("DiffDISLoader", model=models.DOWNLOAD_ENTRY, precision="auto", device="cpu")
    target = tmp_path / models.DOWNLOAD_FOLDER
    assert loaded.folder == target
    from diffdis_core import spec

    assert calls == [(models.DOWNLOAD_REPO, spec.MODEL_FILES + spec.TEXT_ENCODER_FILES, target)]
    assert models.DOWNLOAD_FOLDER in models.list_models()


def test_download_failure_says_where_to_put_the_files(tmp_path, monkeypatch):
    from diffdis_core import DiffDISError, hub

    monkeypatch.setenv(services.MODELS_DIR_ENV, str(tmp_path / "models" / "diffdis"))

    def offline(repo, patterns, local_dir=None, **kwargs):
        raise DiffDISError(f"could not get {patterns[0]} from Hugging Face repo '{repo}' (LocalEntryNotFoundError); "
                           "when offline, download them by hand")

    monkeypatch.setattr(hub, "download", offline)
    with pytest.raises(DiffDISError) as excinfo:
        run("DiffDISLoader", model=models.DOWNLOAD_ENTRY, precision="auto", device="auto")
    message = error_message(excinfo)
    target = tmp_path / "models" / "diffdis" / models.DOWNLOAD_FOLDER
    assert f"could not download qianyu1217/diffdis into {target}" in message
    assert "LocalEntryNotFoundError" in message
    assert "DiffDIS/unet/{config.json, diffusion_pytorch_model.safetensors}" in message
    assert "DiffDIS/vae/" in message and "huggingface.co/qianyu1217/diffdis" in message


def test_model_folder_registration_merges_with_extra_model_paths(tmp_path, monkeypatch, official_tiny):
    """With ComfyUI's folder_paths present: paths from extra_model_paths.yaml (registered before
    custom nodes load) are kept, ComfyUI/models/diffdis is added once, and all are searched."""
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(tmp_path / "ComfyUI" / "models")
    extra = str(tmp_path / "shared" / "diffdis")
    folder_paths.folder_names_and_paths = {"diffdis": ([extra], set())}

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):  # ComfyUI's semantics
        paths = folder_paths.folder_names_and_paths.setdefault(folder_name, ([], set()))[0]
        if full_folder_path in paths:
            if is_default:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        else:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = lambda name: folder_paths.folder_names_and_paths[name][0][:]
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)

    default = os.path.join(folder_paths.models_dir, "diffdis")
    PACK.nodes.register_model_folder()
    PACK.nodes.register_model_folder()
    assert folder_paths.folder_names_and_paths["diffdis"][0] == [extra, default]
    copy_tiny(official_tiny, Path(default) / "tiny")
    (Path(extra) / "shared_model").mkdir(parents=True)
    assert models.list_models() == ["shared_model", "tiny", models.DOWNLOAD_ENTRY]
    assert services.model_roots() == [Path(extra), Path(default)]

    del folder_paths.folder_names_and_paths["diffdis"]
    PACK.nodes.register_model_folder()
    assert folder_paths.folder_names_and_paths["diffdis"] == ([default], set())


# ---------------------------------------------------------------------------- the three stages
def test_nodes_give_the_core_pipelines_result(model):
    image = images(batch=1)
    mask, edge = segment(model, image, seed=3)
    expected = model.pipeline(image.movedim(-1, 1), processing_res=RES, generator=torch.Generator().manual_seed(3))
    assert mask.shape == edge.shape == (1, 40, 56)
    torch.testing.assert_close(mask, expected.mask[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(edge, expected.edge[:, 0], atol=1e-6, rtol=0)
    assert mask.device.type == "cpu" and mask.dtype == torch.float32


def test_batch_rgba_input_and_per_image_seeding(model):
    batch = images(batch=3, channels=4)
    mask, edge = segment(model, batch, seed=11)
    assert mask.shape == edge.shape == (3, 40, 56)
    rgb_mask, _ = segment(model, batch[..., :3], seed=11)
    torch.testing.assert_close(mask, rgb_mask, atol=0, rtol=0)  # the alpha channel is ignored
    # Each image's mask is what it gets alone: the batch does not change it.
    for i in range(3):
        alone, _ = segment(model, batch[i:i + 1], seed=11)
        assert_close_across_kernels(mask[i:i + 1], alone)
    assert not torch.allclose(mask[0], mask[1])
    other_seed, _ = segment(model, batch, seed=12)
    assert not torch.allclose(mask, other_seed)


def test_ensemble_and_tta_match_the_core(model):
    image = images(batch=1, seed=5)
    mask, edge = segment(model, image, seed=2, ensemble=2, tta=True, res=256)  # TTA: a multiple of 256
    expected = model.pipeline(image.movedim(-1, 1), processing_res=256, generator=torch.Generator().manual_seed(2),
                              ensemble_size=2, tta=True)
    torch.testing.assert_close(mask, expected.mask[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(edge, expected.edge[:, 0], atol=1e-5, rtol=0)


def test_normalize_is_the_authors_min_max(model):
    image = images(batch=2, height=RES, width=RES)  # at the processing size: no resize after the min-max
    raw, _ = segment(model, image, normalize=False)
    normalized, _ = segment(model, image, normalize=True)
    expected = model.pipeline(image[:1].movedim(-1, 1), processing_res=RES, generator=torch.Generator().manual_seed(0),
                              minmax=False)
    torch.testing.assert_close(raw[:1], expected.mask[:, 0], atol=1e-6, rtol=0)
    for r, n in zip(raw, normalized, strict=True):
        assert n.min().item() == pytest.approx(0.0, abs=1e-6) and n.max().item() == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(n, (r - r.min()) / (r.max() - r.min()), atol=1e-5, rtol=0)
    assert raw.max() - raw.min() < 0.9  # so the check above is not trivially true


def test_sizes_change_between_runs(model):
    wide, _ = segment(model, images(batch=1, height=40, width=56))
    tall, _ = segment(model, images(batch=2, height=72, width=48))
    square, _ = segment(model, images(batch=1, height=64, width=64))
    assert wide.shape == (1, 40, 56) and tall.shape == (2, 72, 48) and square.shape == (1, 64, 64)


def count_decoded_maps(model, monkeypatch) -> list:
    """The batch size of every VAE decoder call."""
    calls = []
    decoder = model.pipeline.vae.decoder
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda z, *a, **k: calls.append(z.shape[0]) or original(z, *a, **k))
    return calls


def test_decode_mask_only_skips_the_edge_decode(model, monkeypatch):
    """decode = mask only runs the VAE decoder on the mask latents alone; the edge output is then an
    empty mask of the right shape, so a graph that still previews it keeps running."""
    batch = images(batch=2)
    (cond,) = run("DiffDISEncodeCondition", model=model, image=batch, processing_res=RES)
    (latents,) = run("DiffDISOneStepSegment", model=model, cond=cond, seed=1, ensemble=1, tta=False)
    calls = count_decoded_maps(model, monkeypatch)
    mask_only, empty_edge = run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="mask only")
    assert sum(calls) == 2  # one map per image
    calls.clear()
    mask, edge = run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="mask and edge")
    assert sum(calls) == 4  # mask and edge per image
    torch.testing.assert_close(mask_only, mask, atol=1e-6, rtol=0)
    assert empty_edge.shape == edge.shape == (2, 40, 56) and empty_edge.abs().max() == 0 and edge.max() > 0
    calls.clear()
    # Called outside a prompt (no "decode" input, no prompt): auto cannot tell, so both maps, as before.
    old_mask, old_edge = run("DiffDISDecode", model=model, latents=latents, normalize=True)
    assert sum(calls) == 4
    torch.testing.assert_close(old_edge, edge, atol=0, rtol=0)
    decode_option = NODES["DiffDISDecode"].INPUT_TYPES()["optional"]["decode"]
    assert decode_option[0] == "COMBO" and decode_option[1]["options"] == ["auto", "mask only", "mask and edge"]
    assert decode_option[1]["default"] == "auto"


def decode_prompt(edge_consumers: int, decode=None) -> dict:
    """An API-format prompt around Decode node "5": its mask goes to node "6"; ``edge_consumers`` nodes
    take its edge (output 1). Node "9" takes output 1 of another node, which is no edge of "5"."""
    prompt = {
        "3": {"class_type": "DiffDISOneStepSegment", "inputs": {"cond": ["2", 0], "seed": 0}},
        "5": {"class_type": "DiffDISDecode", "inputs": {"latents": ["3", 0], "normalize": True}},
        "6": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["15", 1]}},
    }
    if decode is not None:
        prompt["5"]["inputs"]["decode"] = decode
    for i in range(edge_consumers):
        prompt[str(7 + 10 * i)] = {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}}
    return prompt


def test_decode_auto_decodes_the_edge_only_when_its_output_is_linked(model, monkeypatch):
    """decode = auto (the default) asks the running prompt (ComfyUI's hidden PROMPT and UNIQUE_ID inputs)
    whether anything takes the edge output: one VAE decode per image when nothing does, two when it is."""
    hidden = NODES["DiffDISDecode"].define_schema().hidden
    assert [h.value for h in hidden] == ["PROMPT", "UNIQUE_ID"]
    batch = images(batch=2)
    (cond,) = run("DiffDISEncodeCondition", model=model, image=batch, processing_res=RES)
    (latents,) = run("DiffDISOneStepSegment", model=model, cond=cond, seed=1, ensemble=1, tta=False)
    calls = count_decoded_maps(model, monkeypatch)
    both_mask, both_edge = run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="mask and edge")
    calls.clear()

    unlinked_mask, unlinked_edge = run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="auto",
                                       prompt=decode_prompt(0), unique_id="5")
    assert sum(calls) == 2  # the mask of each image only
    torch.testing.assert_close(unlinked_mask, both_mask, atol=1e-6, rtol=0)
    assert unlinked_edge.shape == both_edge.shape and unlinked_edge.abs().max() == 0
    for consumers in (1, 2):
        calls.clear()
        mask, edge = run("DiffDISDecode", model=model, latents=latents, normalize=True, prompt=decode_prompt(consumers),
                         unique_id="5")  # no decode value: an API prompt saved before the option existed
        assert sum(calls) == 4
        torch.testing.assert_close(edge, both_edge, atol=0, rtol=0)
        torch.testing.assert_close(mask, both_mask, atol=0, rtol=0)
    # A node the prompt does not hold (e.g. made by a node expansion): auto cannot tell, both maps.
    calls.clear()
    run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="auto", prompt=decode_prompt(0),
        unique_id="42")
    assert sum(calls) == 4
    # An explicit choice is kept whatever the links.
    calls.clear()
    run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="mask only", prompt=decode_prompt(1),
        unique_id="5")
    assert sum(calls) == 2


def test_edge_use_is_part_of_what_comfyui_caches_decode_by():
    """ComfyUI caches a node's outputs by its own inputs and ancestors, not by what uses them: the pack's
    on-prompt handler writes into each auto Decode node whether its edge is used, so linking the edge after a
    run re-runs Decode instead of serving the cached empty edge. Explicit choices are left alone."""
    edge_key = segmentation.EDGE_USE_KEY
    unlinked = segmentation.mark_edge_use({"prompt": decode_prompt(0), "client_id": "x"})
    linked = segmentation.mark_edge_use({"prompt": decode_prompt(1, decode="auto")})
    assert unlinked["prompt"]["5"]["inputs"][edge_key] is False and unlinked["client_id"] == "x"
    assert linked["prompt"]["5"]["inputs"][edge_key] is True
    for choice in ("mask only", "mask and edge"):
        explicit = segmentation.mark_edge_use({"prompt": decode_prompt(1, decode=choice)})
        assert edge_key not in explicit["prompt"]["5"]["inputs"]
    by_link = segmentation.mark_edge_use({"prompt": decode_prompt(1, decode=["20", 0])})  # a primitive's value
    assert by_link["prompt"]["5"]["inputs"][edge_key] is True
    # Nothing else changes, and what is not a prompt passes through.
    assert {k: v for k, v in linked["prompt"]["5"]["inputs"].items() if k != edge_key} == \
        decode_prompt(1, decode="auto")["5"]["inputs"]
    for request in ({}, {"prompt": None}, {"prompt": {"1": "junk", "2": {"class_type": "DiffDISDecode"}}}):
        assert segmentation.mark_edge_use(request) is request
    # The key is no input of the node: ComfyUI does not pass it (nor validate it).
    assert edge_key not in all_node_inputs("DiffDISDecode")


def all_node_inputs(node_id: str) -> set:
    types = NODES[node_id].INPUT_TYPES()
    return {name for section in types.values() for name in section}


def test_the_edge_use_handler_is_registered_with_comfyuis_server(monkeypatch):
    added = []
    instance = types.SimpleNamespace(on_prompt_handlers=added, add_on_prompt_handler=added.append)
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=instance)
    monkeypatch.setitem(sys.modules, "server", server)
    assert services.register_prompt_handler(segmentation.mark_edge_use) is True
    assert services.register_prompt_handler(segmentation.mark_edge_use) is False  # once
    assert added == [segmentation.mark_edge_use]
    monkeypatch.setitem(sys.modules, "server", None)  # outside ComfyUI: nothing to register with
    assert services.register_prompt_handler(segmentation.mark_edge_use) is False


def test_frame_conditions_keep_no_processing_size_images(model):
    """A condition holds the latents and a reference to the frames it was given, no resized copy
    (12.6 MB per 1024² frame in float32); TTA still works from it."""
    frames = images(batch=2, height=300, width=200)
    (cond,) = run("DiffDISEncodeCondition", model=model, image=frames, processing_res=256)
    assert cond.frames is frames and cond.processing_res == 256 and cond.sizes == [(300, 200)] * 2
    latent_bytes = sum(latent.numel() * latent.element_size() for latent in cond.rgb_latents)
    own = [value for value in vars(cond).values() if isinstance(value, torch.Tensor) and value is not frames]
    assert own == [] and latent_bytes < 2 * 3 * 256 * 256 * 4 / 10
    (latents,) = run("DiffDISOneStepSegment", model=model, cond=cond, seed=0, ensemble=1, tta=True)
    mask, _ = run("DiffDISDecode", model=model, latents=latents, normalize=True, decode="mask only")
    expected = model.pipeline(frames[:1].movedim(-1, 1), processing_res=256, tta=True,
                              generator=torch.Generator().manual_seed(0), decode_edge=False)
    assert_close_across_kernels(mask[:1], expected.mask[:, 0])


def remove_background(model, image, background="alpha", custom_color="#3366CC", seed=0, tta=False, res=RES):
    """Remove Background's image and mask (its rgb output: test_cutout_rgb_output)."""
    return run("DiffDISRemoveBackground", model=model, image=image, processing_res=res, seed=seed, tta=tta,
               background=background, custom_color=custom_color)[:2]


def test_remove_background_is_the_staged_cutout_in_one_node(model, monkeypatch):
    batch = images(batch=3, channels=4)
    staged_mask, _ = segment(model, batch, seed=7, decode="mask only")
    staged_cutout, _, _ = run("DiffDISApplyAlpha", image=batch, mask=staged_mask, background="alpha",
                           custom_color="#3366CC", mask_blur=0, mask_expand=0, threshold=0.0, invert=False)
    calls = count_decoded_maps(model, monkeypatch)
    cutout_image, mask = remove_background(model, batch, seed=7)
    assert sum(calls) == 3  # the mask only
    assert cutout_image.shape == (3, 40, 56, 4) and mask.shape == (3, 40, 56)
    assert_close_across_kernels(mask, staged_mask)
    assert_close_across_kernels(cutout_image, staged_cutout)
    on_green, _ = remove_background(model, batch[..., :3], background="green", seed=7)
    colours = cutout_image[..., :3]  # the subject's estimated colours (refine_foreground, on by default)
    expected = colours * mask[..., None] + torch.tensor([0.0, 1.0, 0.0]) * (1 - mask[..., None])
    assert on_green.shape == (3, 40, 56, 3)
    assert_close_across_kernels(on_green, expected)
    other_seed, other_mask = remove_background(model, batch, seed=8)
    assert not torch.allclose(other_mask, mask)


def test_remove_background_with_tta_matches_the_core(model):
    image = images(batch=1, seed=3)
    _, mask = remove_background(model, image, seed=5, tta=True, res=256)
    expected = model.pipeline(image.movedim(-1, 1), processing_res=256, tta=True, decode_edge=False,
                              generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(mask, expected.mask[:, 0], atol=1e-5, rtol=0)


def test_bad_remove_background_options(model):
    from diffdis_core import DiffDISError

    with pytest.raises(DiffDISError, match="background 'blue' is not one of alpha, white"):
        remove_background(model, images(batch=1), background="blue")
    with pytest.raises(DiffDISError, match="custom_color 'nope' is not a colour"):
        remove_background(model, images(batch=1), background="custom", custom_color="nope")
    with pytest.raises(DiffDISError, match="model must come from a Load DiffDIS node"):
        remove_background("model", images(batch=1))


def fake_model_management(monkeypatch, **overrides) -> types.SimpleNamespace:
    """The parts of comfy.model_management the nodes use, on the CPU."""
    calls = types.SimpleNamespace(unet_dtype=[], loads=[])
    management = types.ModuleType("comfy.model_management")
    management.get_torch_device = lambda: torch.device("cpu")
    management.unet_offload_device = lambda: torch.device("cpu")
    management.intermediate_device = lambda: torch.device("cpu")
    management.intermediate_dtype = lambda: torch.float32
    management.get_free_memory = lambda device: 8 << 30
    management.soft_empty_cache = lambda: None
    management.throw_exception_if_processing_interrupted = lambda: None
    management.load_models_gpu = lambda models, **kwargs: calls.loads.append(kwargs)

    def unet_dtype(device=None, model_params=0, supported_dtypes=(), weight_dtype=None):
        calls.unet_dtype.append((device, model_params, list(supported_dtypes)))
        return supported_dtypes[0]

    management.unet_dtype = unet_dtype
    for name, value in overrides.items():
        setattr(management, name, value)
    monkeypatch.setitem(sys.modules, "comfy.model_management", management)
    return calls


def test_background_removal_output_works_like_comfyuis_own_models(model, monkeypatch):
    """What core Remove Background does with it (comfy_extras/nodes_bg_removal.py, ComfyUI 0.21):
    mask = bg_removal_model.encode_image(image), a [B, 1, H, W] mask in 0..1 on ComfyUI's
    intermediate device and dtype."""
    assert cutout.DiffDISBackgroundRemoval(model).image_size == 1024  # what the loader hands out: as trained
    bg_model = cutout.DiffDISBackgroundRemoval(model, processing_res=RES)  # the tiny model's size
    batch = images(batch=2)
    fake_model_management(monkeypatch, intermediate_dtype=lambda: torch.float16)
    mask = bg_model.encode_image(batch)
    assert mask.shape == (2, 1, 40, 56) and mask.dtype == torch.float16 and mask.device.type == "cpu"
    assert 0 <= mask.min() < mask.max() <= 1
    expected, _ = segment(model, batch, seed=0, decode="mask only")
    torch.testing.assert_close(mask[:, 0].float(), expected, atol=1e-3, rtol=0)  # seed 0, float16 out
    assert bg_model.patcher is model.patcher and bg_model.model is model.modules
    assert bg_model.load_device == model.load_device


def test_auto_precision_is_the_cores_rule_unless_comfyui_has_an_opinion(monkeypatch, models_root):
    from diffdis_core import devices

    # Without ComfyUI, and in ComfyUI on the CPU without a precision flag: the core's rule.
    for native_bf16, expected in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda native=native_bf16: native)
        assert services.choose_dtype("auto", torch.device("cpu"), 10) == expected
        calls = fake_model_management(monkeypatch)
        assert services.choose_dtype("auto", torch.device("cpu"), 10) == expected and calls.unet_dtype == []
        monkeypatch.setitem(sys.modules, "comfy.model_management", None)
    # A flag such as --fp16-unet: ComfyUI decides, told the UNet's real size.
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(fp16_unet=True)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    calls = fake_model_management(monkeypatch, unet_dtype=lambda **kwargs: calls.unet_dtype.append(kwargs) or
                                  torch.float16)
    loaded, _ = run("DiffDISLoader", model="tiny", precision="auto", device="auto")
    assert loaded.dtype == torch.float16
    (asked,) = calls.unet_dtype
    assert asked["model_params"] == sum(t.numel() for t in loaded.pipeline.unet.state_dict().values())
    assert asked["supported_dtypes"][0] == devices.auto_dtype("cpu")  # the core's choice first
    # fp8 flags are for ComfyUI's own model classes: this UNet falls back to the core's choice.
    fake_model_management(monkeypatch, unet_dtype=lambda **kwargs: torch.float8_e4m3fn)
    assert services.choose_dtype("auto", torch.device("cpu"), 10) == devices.auto_dtype("cpu")
    # An explicit precision is taken as it is.
    assert services.choose_dtype("bf16", torch.device("cpu"), 10) == torch.bfloat16


@pytest.mark.parametrize("device, channels_last", [("cpu", True), ("cuda", True), ("mps", False)])
def test_memory_format_follows_the_load_device(device, channels_last, monkeypatch):
    """The model is built on the offload device (the CPU) and ComfyUI moves it keeping its layout,
    so the layout is chosen for where it will run: channels-last except on Apple MPS."""
    monkeypatch.setattr(services, "choose_devices", lambda option: (torch.device(device), torch.device("cpu")))
    loaded, _ = run("DiffDISLoader", model="tiny", precision="fp32", device="auto")
    assert loaded.load_device.type == device and loaded.pipeline.device.type == "cpu"
    weight = next(layer.weight for layer in loaded.pipeline.unet.modules() if isinstance(layer, torch.nn.Conv2d)
                  and layer.weight.shape[-1] == 3 and layer.weight.shape[1] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert weight.is_contiguous() != channels_last


class Recorder:
    """Stands in for ComfyUI's ProgressBar."""

    bars: list = []

    def __init__(self, total):
        self.total, self.updates = total, []
        Recorder.bars.append(self)

    def update(self, value):
        self.updates.append(value)


@pytest.fixture
def memory_chunks_only(monkeypatch):
    """Chunks sized by memory alone (no time cap), for tests that count chunks."""
    monkeypatch.setattr(batching, "TARGET_CHUNK_SECONDS", None)


def test_batches_run_in_chunks_sized_to_free_memory(model, monkeypatch, memory_chunks_only):
    batch = images(batch=5)
    whole_mask, whole_edge = segment(model, batch, seed=4, ensemble=2)

    calls = {"encode_condition": [], "segment": [], "decode": []}
    for stage in calls:
        original = getattr(model.pipeline, stage)

        def counted(*args, _original=original, _stage=stage, **kwargs):
            first = args[0]
            calls[_stage].append(len(first.sizes) if hasattr(first, "sizes") else first.shape[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(model.pipeline, stage, counted)
    monkeypatch.setattr(batching, "chunk_size", lambda bytes_per_image, device: 2)  # two images fit at a time
    monkeypatch.setattr(services, "progress_bar", Recorder)
    Recorder.bars = []
    mask, edge = segment(model, batch, seed=4, ensemble=2)

    assert calls == {"encode_condition": [2, 2, 1], "segment": [2, 2, 1], "decode": [2, 2, 1]}
    assert_close_across_kernels(mask, whole_mask)
    assert_close_across_kernels(edge, whole_edge)
    encode_bar, segment_bar, decode_bar = Recorder.bars
    assert (encode_bar.total, encode_bar.updates) == (5, [2, 2, 1])
    assert (segment_bar.total, segment_bar.updates) == (10, [2, 2, 2, 2, 1, 1])  # per UNet call: 2 draws
    assert (decode_bar.total, decode_bar.updates) == (5, [2, 2, 1])


def test_chunks_are_sized_by_time_so_cancel_and_progress_stay_responsive(monkeypatch):
    """The first chunk is one item; later chunks hold what runs in about TARGET_CHUNK_SECONDS at the
    pace so far, never more than fits in memory."""
    clock = [0.0]
    monkeypatch.setattr(batching.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(batching, "TARGET_CHUNK_SECONDS", 2.0)

    def work_at(seconds_per_item):
        sizes = []

        def work(start, stop):
            sizes.append(stop - start)
            clock[0] += seconds_per_item * (stop - start)
            return list(range(start, stop))

        return sizes, work

    sizes, work = work_at(10.0)  # a slow CPU: one image per chunk
    parts = batching.run_in_chunks(5, 32, work)
    assert sizes == [1, 1, 1, 1, 1] and [i for part in parts for i in part] == list(range(5))
    sizes, work = work_at(0.5)  # four images in two seconds
    batching.run_in_chunks(13, 32, work)
    assert sizes == [1, 4, 4, 4]
    sizes, work = work_at(0.001)  # a GPU: memory is the limit
    batching.run_in_chunks(40, 16, work)
    assert sizes == [1, 16, 16, 7]


def test_chunk_size_follows_memory_and_is_capped(monkeypatch):
    per_image = batching.encode_bytes(1024, torch.float16)
    monkeypatch.setattr(services, "free_memory", lambda device: 3 * per_image + 1)
    assert batching.chunk_size(per_image, torch.device("cpu")) == 3
    monkeypatch.setattr(services, "free_memory", lambda device: per_image // 2)
    assert batching.chunk_size(per_image, torch.device("cpu")) == 1
    monkeypatch.setattr(services, "free_memory", lambda device: 10_000 * per_image)
    assert batching.chunk_size(per_image, torch.device("cpu")) == batching.MAX_CHUNK
    assert batching.segment_bytes(1024, torch.float16, torch.float32, tta=True) > \
        batching.segment_bytes(1024, torch.float16, torch.float32, tta=False)


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, checks_allowed: int) -> list:
    """services.check_interrupted raises (as Cancel does) once it has been asked ``checks_allowed`` times."""
    checks = []

    def check_interrupted():
        checks.append(1)
        if len(checks) > checks_allowed:
            raise Interrupted

    monkeypatch.setattr(services, "check_interrupted", check_interrupted)
    return checks


def count_convolutions(module: torch.nn.Module) -> list:
    calls = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("node", ["DiffDISOneStepSegment", "DiffDISDecode", "DiffDISRemoveBackground"])
def test_cancel_lands_inside_the_model_not_after_it(node, monkeypatch, official_tiny, models_root):
    """Cancel is checked before every convolution of the UNet and VAE: pressed during the first one,
    the node stops right there instead of finishing the chunk's UNet call or decode."""
    model, _ = run("DiffDISLoader", model="tiny", precision="fp32", device="cpu")  # hooks below stay on this one
    unet_convs, vae_convs = count_convolutions(model.pipeline.unet), count_convolutions(model.pipeline.vae)
    image = images(batch=2)
    (cond,) = run("DiffDISEncodeCondition", model=model, image=image, processing_res=RES)
    (latents,) = run("DiffDISOneStepSegment", model=model, cond=cond, seed=0, ensemble=1, tta=False)
    unet_per_call, vae_per_run = len(unet_convs), len(vae_convs)
    unet_convs.clear(), vae_convs.clear()

    checks = interrupt_after(monkeypatch, checks_allowed=3)
    with pytest.raises(Interrupted):
        if node == "DiffDISOneStepSegment":
            run(node, model=model, cond=cond, seed=0, ensemble=1, tta=False)
        elif node == "DiffDISDecode":
            run(node, model=model, latents=latents, normalize=True, decode="mask only")
        else:
            run(node, model=model, image=image, processing_res=RES, seed=0, tta=False, background="alpha",
                custom_color="#000000")
    assert len(unet_convs) + len(vae_convs) == 2  # stopped at the third convolution (the first check is a chunk's)
    assert len(checks) == 4 and unet_per_call > 10 and vae_per_run > 10

    # The hooks went with the node: the model runs on as before, asking nobody.
    checks.clear()
    monkeypatch.setattr(services, "check_interrupted", lambda: checks.append(1))
    model.pipeline(image.movedim(-1, 1), processing_res=RES)
    assert checks == []


def test_cancel_leaves_compiled_parts_alone(model, monkeypatch):
    """A hook added to a torch.compile'd module forces a recompile: those parts are skipped."""
    vae = model.pipeline.vae
    all_convs = services._convolutions(vae)
    monkeypatch.setattr(vae.decoder, "_compiled_call_impl", lambda *args, **kwargs: None, raising=False)
    kept = services._convolutions(vae)
    decoder_convs = {id(layer) for layer in vae.decoder.modules() if isinstance(layer, torch.nn.Conv2d)}
    assert decoder_convs and not decoder_convs & {id(layer) for layer in kept}
    assert len(kept) == len(all_convs) - len(decoder_convs)


def test_out_of_memory_halves_the_chunk_and_retries(memory_chunks_only):
    sizes = []

    def work(start, stop):
        sizes.append(stop - start)
        if stop - start > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return list(range(start, stop))

    parts = batching.run_in_chunks(8, 8, work)
    assert [i for part in parts for i in part] == list(range(8))
    assert sizes == [8, 4, 2, 2, 2, 2]  # 8 and 4 run out of memory, chunks of 2 fit

    def always_oom(start, stop):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        batching.run_in_chunks(2, 2, always_oom)


# ---------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("value, nearest", [(60, "use 64"), (100, "use 64 or 128"), (0, "use 64"), (8, "use 64"),
                                            (4104, "use 4096"), ("64", None), (True, None), (64.0, None)])
def test_bad_processing_res(model, value, nearest):
    from diffdis_core import DiffDISError

    for node, extra in [("DiffDISEncodeCondition", {}),
                        ("DiffDISRemoveBackground", {"seed": 0, "tta": False, "background": "alpha",
                                                     "custom_color": "#000000"})]:
        with pytest.raises(DiffDISError) as excinfo:
            run(node, model=model, image=images(batch=1), processing_res=value, **extra)
        message = error_message(excinfo)
        assert message.startswith("processing_res must be a ")
        if nearest:
            assert message.endswith(nearest)


def test_tta_needs_a_processing_res_the_views_can_use(model):
    from diffdis_core import DiffDISError

    (cond,) = run("DiffDISEncodeCondition", model=model, image=images(batch=1), processing_res=128)
    with pytest.raises(DiffDISError) as excinfo:
        run("DiffDISOneStepSegment", model=model, cond=cond, seed=0, ensemble=1, tta=True)
    assert "multiple of 256" in error_message(excinfo) and "use 256" in error_message(excinfo)
    with pytest.raises(DiffDISError, match="multiple of 256"):
        run("DiffDISRemoveBackground", model=model, image=images(batch=1), processing_res=128, seed=0, tta=True,
            background="alpha", custom_color="#000000")


@pytest.mark.parametrize("image, expected", [
    (torch.rand(1, 3, 32, 32)[..., :2], "must be an IMAGE [batch, height, width, 3 or 4 channels]"),
    (torch.rand(32, 32), "must be an IMAGE"),
    ("image.png", "image must be an IMAGE tensor, got str"),
])
def test_bad_image(model, image, expected):
    from diffdis_core import DiffDISError

    with pytest.raises(DiffDISError, match=expected.replace("[", r"\[")):
        run("DiffDISEncodeCondition", model=model, image=image, processing_res=RES)


def test_bad_segment_and_decode_inputs(model):
    from diffdis_core import DiffDISError

    (cond,) = run("DiffDISEncodeCondition", model=model, image=images(batch=1), processing_res=RES)
    with pytest.raises(DiffDISError, match="cond must come from a DiffDIS Encode Condition node, got Tensor"):
        run("DiffDISOneStepSegment", model=model, cond=torch.zeros(1), seed=0, ensemble=1, tta=False)
    with pytest.raises(DiffDISError, match="model must come from a Load DiffDIS node, got dict"):
        run("DiffDISOneStepSegment", model={}, cond=cond, seed=0, ensemble=1, tta=False)
    with pytest.raises(DiffDISError, match="latents must come from a DiffDIS One-Step Segment node, got"):
        run("DiffDISDecode", model=model, latents=cond, normalize=True)


# ---------------------------------------------------------------------------- Apply Alpha
def apply(image, mask, background="alpha", custom_color="#3366CC", mask_blur=0, mask_expand=0, threshold=0.0,
          invert=False, **refinements):
    """Apply Alpha's image and mask as an API prompt saved before the refinements gives it, or with
    ``refinements`` (its rgb output: test_cutout_rgb_output)."""
    return run("DiffDISApplyAlpha", image=image, mask=mask, background=background, custom_color=custom_color,
               mask_blur=mask_blur, mask_expand=mask_expand, threshold=threshold, invert=invert, **refinements)[:2]


def square_mask(batch=2, size=32, low=8, high=24, value=1.0) -> torch.Tensor:
    mask = torch.zeros(batch, size, size)
    mask[:, low:high, low:high] = value
    return mask


def test_alpha_output_is_rgba_with_the_mask_as_alpha():
    image = images(batch=2, height=32, width=32, channels=4)
    mask = torch.rand(2, 32, 32)
    out, out_mask = apply(image, mask, refine_foreground=False)
    assert out.shape == (2, 32, 32, 4)
    torch.testing.assert_close(out[..., :3], image[..., :3])
    torch.testing.assert_close(out[..., 3], mask)
    torch.testing.assert_close(out_mask, mask)
    refined, refined_mask = apply(image, mask)  # the default: the subject's colours (straight alpha)
    torch.testing.assert_close(refined[..., 3], mask)
    torch.testing.assert_close(refined_mask, mask)
    assert refined.shape == (2, 32, 32, 4) and not torch.allclose(refined[..., :3], image[..., :3])


@pytest.mark.parametrize("background, color", [
    ("white", (1.0, 1.0, 1.0)), ("black", (0.0, 0.0, 0.0)), ("gray", (0.5, 0.5, 0.5)), ("green", (0.0, 1.0, 0.0)),
    ("custom", (0x33 / 255, 0x66 / 255, 0xCC / 255)),
])
def test_colour_backgrounds_give_rgb_composites(background, color):
    image = images(batch=2, height=32, width=32)
    mask = square_mask()
    mask[:, 0, 0] = 0.25  # a soft pixel
    out, _ = apply(image, mask, background=background, refine_foreground=False)
    assert out.shape == (2, 32, 32, 3)
    fill = torch.tensor(color)
    torch.testing.assert_close(out[:, 31, 31], fill.expand(2, 3))  # background
    torch.testing.assert_close(out[:, 16, 16], image[:, 16, 16])  # foreground
    torch.testing.assert_close(out[:, 0, 0], 0.25 * image[:, 0, 0] + 0.75 * fill)


@pytest.mark.parametrize("text, rgb", [("#FF8000", (1.0, 128 / 255, 0.0)), ("f80", (1.0, 136 / 255, 0.0)),
                                       (" 0, 255 ,17 ", (0.0, 1.0, 17 / 255))])
def test_custom_colour_formats(text, rgb):
    out, _ = apply(images(batch=1, height=8, width=8), torch.zeros(8, 8), background="custom", custom_color=text)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(rgb))


@pytest.mark.parametrize("text", ["orange", "#12345", "256,0,0", "1,2"])
def test_bad_custom_colour(text):
    from diffdis_core import DiffDISError

    with pytest.raises(DiffDISError, match="custom_color .* is not a colour: write it as #RRGGBB"):
        apply(images(batch=1, height=8, width=8), torch.zeros(8, 8), background="custom", custom_color=text)


def test_mask_shapes_sizes_and_batches():
    image = images(batch=3, height=32, width=32)
    mask = torch.rand(32, 32)
    out_2d, _ = apply(image, mask)  # [H, W]: one mask for every image
    out_3d, _ = apply(image, mask.expand(3, 32, 32))
    out_4d, _ = apply(image, mask.expand(3, 1, 32, 32))
    torch.testing.assert_close(out_2d, out_3d)
    torch.testing.assert_close(out_4d, out_3d)
    small = square_mask(batch=1, size=16, low=4, high=12)
    out, out_mask = apply(image, small)  # another size: resized to the image
    assert out_mask.shape == (3, 32, 32) and out_mask[0, 16, 16] == 1 and out_mask[0, 0, 0] == 0
    single, masks = apply(image[:1], torch.rand(3, 32, 32))  # one image, three masks
    assert single.shape == (3, 32, 32, 4)
    from diffdis_core import DiffDISError

    with pytest.raises(DiffDISError, match=r"image batch \(3\) and mask batch \(2\) differ"):
        apply(image, torch.rand(2, 32, 32))
    with pytest.raises(DiffDISError, match=r"mask must be a MASK \[batch, height, width\] or \[height, width\]"):
        apply(image, torch.rand(32))


def test_threshold_invert_expand_and_blur():
    image = images(batch=1, height=32, width=32)
    soft = square_mask(batch=1, value=0.6)
    soft[:, 8:24, 8] = 0.3
    _, hard = apply(image, soft, threshold=0.5)
    assert set(hard.unique().tolist()) == {0.0, 1.0} and hard[0, 16, 8] == 0 and hard[0, 16, 9] == 1
    _, kept_soft = apply(image, soft, threshold=0.0)
    torch.testing.assert_close(kept_soft, soft)
    _, inverted = apply(image, soft, threshold=0.5, invert=True)
    torch.testing.assert_close(inverted, 1 - hard)

    square = square_mask(batch=1)  # ones on rows/cols 8..23
    _, grown = apply(image, square, mask_expand=2)
    assert grown.sum() == 20 * 20 and grown[0, 6, 6] == 1 and grown[0, 5, 5] == 0
    _, shrunk = apply(image, square, mask_expand=-3)
    assert shrunk.sum() == 10 * 10 and shrunk[0, 11, 11] == 1 and shrunk[0, 10, 10] == 0
    _, blurred = apply(image, square, mask_blur=3)
    assert blurred[0, 16, 16].item() == pytest.approx(1.0) and blurred[0, 0, 0].item() == pytest.approx(0.0)
    assert 0.3 < blurred[0, 16, 8] < 0.7 and 0 < blurred[0, 16, 6] < 0.2  # a soft edge across the border
    assert blurred.sum().item() == pytest.approx(square.sum().item(), rel=0.01)
    _, inverted_grown = apply(image, square, invert=True, mask_expand=1)
    assert inverted_grown[0, 8, 8] == 1 and inverted_grown[0, 9, 9] == 0  # the kept region (background) grew


@pytest.mark.parametrize("option, value, message", [
    ("background", "blue", "background 'blue' is not one of alpha, white, black, gray, green, custom"),
])
def test_bad_apply_alpha_options(option, value, message):
    from diffdis_core import DiffDISError

    with pytest.raises(DiffDISError, match=message):
        apply(images(batch=1, height=8, width=8), torch.zeros(8, 8), **{option: value})


# ---------------------------------------------------------------------------- cutout refinements
def test_refinement_inputs_are_optional_with_tooltips_and_search_words():
    for node_id in ("DiffDISApplyAlpha", "DiffDISRemoveBackground"):
        optional = NODES[node_id].INPUT_TYPES()["optional"]
        for name in ("refine_foreground", "refine_edges"):
            kind, options = optional[name]
            assert kind == "BOOLEAN" and options["default"] is True and len(options["tooltip"]) > 80
        aliases = [alias.lower() for alias in NODES[node_id].define_schema().search_aliases]
        assert {"decontaminate", "color spill", "halo", "refine edges"} <= set(aliases), node_id
    kind, options = NODES["DiffDISApplyAlpha"].INPUT_TYPES()["optional"]["processing_res"]
    assert kind == "INT" and (options["default"], options["step"]) == (1024, 64) and "Encode" in options["tooltip"]


@pytest.mark.parametrize("background", ["alpha", "gray", "custom"])
def test_cutout_rgb_output(model, background):
    """Both cutout nodes offer an always-RGB image after image and mask (slot 2, so saved links keep their
    slots): the image itself for a colour, the cutout on white for alpha, whose image is RGBA. Its tooltip
    and the image's say which goes where."""
    batch = images(batch=2)
    mask = torch.rand(2, 40, 56, generator=torch.Generator().manual_seed(3))
    outputs = {"DiffDISApplyAlpha": run("DiffDISApplyAlpha", image=batch, mask=mask, background=background,
                                        custom_color="#102030", mask_blur=0, mask_expand=0, threshold=0.0,
                                        invert=False),
               "DiffDISRemoveBackground": run("DiffDISRemoveBackground", model=model, image=batch, processing_res=RES,
                                              seed=0, tta=False, background=background, custom_color="#102030")}
    for node_id, (image, alpha, rgb) in outputs.items():
        assert rgb.shape == (2, 40, 56, 3), node_id
        if background == "alpha":
            assert image.shape[-1] == 4
            torch.testing.assert_close(rgb, image[..., :3] * alpha[..., None] + (1 - alpha[..., None]))
        else:
            assert rgb is image
        names, tooltips = NODES[node_id].RETURN_NAMES, NODES[node_id].OUTPUT_TOOLTIPS
        assert names == ["image", "mask", "rgb"]
        assert "Save Image" in tooltips[0] and "VAE Encode" in tooltips[0] and "rgb" in tooltips[0]
        assert "RGB" in tooltips[2] and "white" in tooltips[2]


def to_image(x: torch.Tensor) -> torch.Tensor:
    """The core's [B, C, H, W] as an IMAGE [B, H, W, C] (or a MASK [B, H, W] for one channel)."""
    return x[:, 0] if x.shape[1] == 1 else x.movedim(1, -1)


def to_core(x: torch.Tensor) -> torch.Tensor:
    return x[:, None] if x.ndim == 3 else x.movedim(-1, 1)


def test_refine_foreground_changes_colours_only_where_the_mask_is_soft():
    mask = square_mask(batch=2, size=48, low=12, high=36)
    mask[:, 12:36, 8:12] = torch.linspace(0.1, 0.9, 4)  # a soft band on the left edge
    subject = images(batch=2, height=48, width=48)
    image = mask[..., None] * subject + (1 - mask[..., None]) * torch.tensor([0.1, 0.8, 0.2])  # on green
    plain, _ = apply(image, mask, background="custom", custom_color="#FF00FF", refine_foreground=False)
    refined, _ = apply(image, mask, background="custom", custom_color="#FF00FF")
    changed = (refined - plain).abs().amax(-1) > 1e-6
    soft = (mask > 0) & (mask < 1)
    assert changed[soft].float().mean() > 0.9 and not changed[~soft].any()
    rgba, alpha = apply(image, mask)
    torch.testing.assert_close(rgba[..., 3], alpha)
    torch.testing.assert_close(rgba[..., :3][mask == 1], image[mask == 1], atol=0, rtol=0)


def test_refine_foreground_takes_a_known_background_spill_out():
    """A synthetic photo (textured subject with hair-like strands, holes and glass on another background,
    benchmarks/synthetic_composites.py) with the true mask, cut out onto a new colour: where the mask is
    soft the plain cutout shows the old background; the refined one is far closer to the truth."""
    from benchmarks.synthetic_composites import foreground_error, make_composite

    case = make_composite(96, 128, seed=3)
    image, alpha = to_image(case["image"]), to_image(case["alpha"])
    new_background = torch.tensor([1.0, 0.0, 1.0])
    truth = case["foreground"] * case["alpha"] + new_background[:, None, None] * (1 - case["alpha"])
    plain, _ = apply(image, alpha, background="custom", custom_color="#FF00FF", refine_foreground=False)
    refined, _ = apply(image, alpha, background="custom", custom_color="#FF00FF")
    # The error where the mask is soft, weighted by how much of the subject shows there.
    plain_error = foreground_error(to_core(plain), truth, case["alpha"])
    refined_error = foreground_error(to_core(refined), truth, case["alpha"])
    assert refined_error < 0.4 * plain_error, (plain_error, refined_error)
    rgba, _ = apply(image, alpha)  # the RGBA's colours: the estimated foreground, straight alpha
    assert foreground_error(to_core(rgba[..., :3]), case["foreground"], case["alpha"]) < \
        0.4 * foreground_error(case["image"], case["foreground"], case["alpha"])


def test_refine_edges_only_on_images_larger_than_the_processing_size():
    from diffdis_core import estimate_foreground, refine_alpha

    res = 64
    image = images(batch=2, height=96, width=128, seed=4)
    predicted = torch.rand(2, 1, res, res, generator=torch.Generator().manual_seed(1))
    mask = torch.nn.functional.interpolate(predicted, size=(96, 128), mode="bilinear")[:, 0]  # as Decode gives it
    rgba, alpha = apply(image, mask, processing_res=res)
    expected = refine_alpha(to_core(image), mask[:, None], predicted_at=(res, res))
    torch.testing.assert_close(alpha, expected[:, 0], atol=1e-6, rtol=0)
    assert (alpha - mask).abs().max() > 0.1
    torch.testing.assert_close(rgba[..., :3], to_image(estimate_foreground(to_core(image), expected)),
                               atol=1e-6, rtol=0)
    _, unrefined = apply(image, mask, processing_res=res, refine_edges=False)
    torch.testing.assert_close(unrefined, mask, atol=0, rtol=0)
    # Not larger than the processing size (the default 1024, or equal to it): the mask as it is.
    for size in (1024, 128):
        same, kept = apply(image, mask, processing_res=size, refine_foreground=False)
        torch.testing.assert_close(kept, mask, atol=0, rtol=0)
        torch.testing.assert_close(same[..., :3], image, atol=0, rtol=0)
    from diffdis_core.matting import refines_edges

    assert refines_edges((48, 128), (64, 64)) and not refines_edges((64, 64), (64, 64))  # one side will do


def test_refinements_come_in_order_edges_threshold_grow_feather_then_colours():
    from diffdis_core import estimate_foreground, refine_alpha

    res = 64
    image = images(batch=1, height=80, width=120, seed=6)
    mask = torch.nn.functional.interpolate(square_mask(batch=1, size=res, low=16, high=48)[:, None], size=(80, 120),
                                           mode="bilinear")[:, 0]
    out, alpha = apply(image, mask, threshold=0.5, mask_expand=2, mask_blur=2, background="gray", processing_res=res)
    edges = refine_alpha(to_core(image), mask[:, None], predicted_at=(res, res))[:, 0]
    expected = tensors.refine_mask(edges, 0.5, False, 2, 2)
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=0)
    colours = to_image(estimate_foreground(to_core(image), expected[:, None]))
    torch.testing.assert_close(out, colours * alpha[..., None] + 0.5 * (1 - alpha[..., None]), atol=1e-6, rtol=0)


def test_refinements_run_in_chunks_with_progress_and_cancel(monkeypatch, memory_chunks_only):
    """A batch of frames is refined in chunks that fit the device's memory, giving what one chunk would;
    progress moves per frame, and Cancel stops between chunks."""
    image = images(batch=5, height=96, width=128)
    mask = torch.rand(5, 96, 128, generator=torch.Generator().manual_seed(2))
    whole = refinement.refine_cutouts(image, mask, 64, True, True, torch.device("cpu"))
    per_frame = refinement.BYTES_PER_PIXEL * 96 * 128 + refinement.BYTES_PER_PROCESSING_PIXEL * 64 ** 2
    monkeypatch.setattr(services, "free_memory", lambda device: 2 * per_frame + 1)  # two frames at a time
    progress = services._NoProgress(5)
    sizes = []
    from diffdis_core import cutout as core_cutout

    estimate = core_cutout.estimate_foreground
    monkeypatch.setattr(core_cutout, "estimate_foreground",
                        lambda image, alpha, *rest: sizes.append(image.shape[0]) or estimate(image, alpha, *rest))
    chunked = refinement.refine_cutouts(image, mask, 64, True, True, torch.device("cpu"), progress=progress)
    assert sizes == [2, 2, 1] and progress.current == 5
    for a, b in zip(whole, chunked, strict=True):
        assert_close_across_kernels(a, b)
    interrupt_after(monkeypatch, checks_allowed=1)
    sizes.clear()
    with pytest.raises(Interrupted):
        refinement.refine_cutouts(image, mask, 64, True, True, torch.device("cpu"))
    assert sizes == [2]


def test_remove_background_refines_edges_from_the_processing_size_mask(model):
    """On an image larger than processing_res the one-node cutout brings the mask to the image along its
    edges from the mask at the processing size (the pipeline's refine_edges), which Apply Alpha, given a
    MASK already stretched to the image, can only approximate; the colours are then estimated under it.
    Its mask output is that alpha."""
    from diffdis_core import estimate_foreground

    batch = images(batch=2, height=80, width=104, seed=2)
    one_node, alpha = remove_background(model, batch, seed=4)
    expected = model.pipeline(to_core(batch), processing_res=RES, decode_edge=False, refine_edges=True,
                              generator=[torch.Generator().manual_seed(4) for _ in range(2)]).mask
    assert_close_across_kernels(alpha, expected[:, 0])
    staged_mask, _ = segment(model, batch, seed=4, decode="mask only")
    assert (alpha - staged_mask).abs().max() > 0.01  # refined, not bilinear
    torch.testing.assert_close(one_node[..., 3], alpha, atol=0, rtol=0)
    assert_close_across_kernels(one_node[..., :3], to_image(estimate_foreground(to_core(batch), alpha[:, None])))
    plain, plain_mask, _ = run("DiffDISRemoveBackground", model=model, image=batch, processing_res=RES, seed=4,
                            tta=False, background="alpha", custom_color="#000000", refine_foreground=False,
                            refine_edges=False)
    assert_close_across_kernels(plain_mask, staged_mask)
    assert_close_across_kernels(plain, torch.cat([batch, staged_mask[..., None]], -1))


def test_background_removal_model_refines_edges_of_larger_images(model, monkeypatch):
    """Core Remove Background gets only a mask: on images larger than the processing size its edges are
    refined at full resolution; smaller images get the mask as it is."""
    from diffdis_core import refine_alpha

    fake_model_management(monkeypatch)
    bg_model = cutout.DiffDISBackgroundRemoval(model, processing_res=RES)
    large = images(batch=1, height=72, width=96, seed=8)
    mask = bg_model.encode_image(large)
    staged, _ = segment(model, large, seed=0, decode="mask only")
    processing_size = model.pipeline(to_core(large), processing_res=RES, generator=torch.Generator().manual_seed(0),
                                     decode_edge=False, output_size=False).mask
    torch.testing.assert_close(mask, refine_alpha(to_core(large), processing_size), atol=1e-5, rtol=0)
    assert (mask[:, 0] - staged).abs().max() > 0.01
    small = images(batch=1, height=48, width=64, seed=8)
    staged_small, _ = segment(model, small, seed=0, decode="mask only")
    torch.testing.assert_close(bg_model.encode_image(small)[:, 0], staged_small, atol=1e-6, rtol=0)



def test_loader_compile_toggle_compiles_the_unet_and_vae_and_keeps_the_masks(model, monkeypatch):
    """compile = true: torch.compile'd UNet and VAE (traced here with the eager backend, so the test
    needs no compiler) give the same masks; off by default."""
    plain_mask, _ = segment(model, images(batch=1))
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager"))
    compiled, _ = run("DiffDISLoader", model="tiny", precision="fp32", device="cpu", compile=True)
    pipe = compiled.pipeline
    assert all(getattr(m, "_compiled_call_impl", None) is not None
               for m in (pipe.unet, pipe.vae.encoder, pipe.vae.decoder))
    assert model.pipeline.unet._compiled_call_impl is None
    compiled_mask, _ = segment(compiled, images(batch=1))
    torch.testing.assert_close(compiled_mask, plain_mask, atol=1e-5, rtol=0)


def test_loader_compile_without_a_compiler_says_what_to_install(monkeypatch):
    from diffdis_core import DiffDISError, devices

    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    with pytest.raises(DiffDISError,
                       match="compile on the CPU needs a C\\+\\+ compiler .* or turn compile off in Load DiffDIS"):
        run("DiffDISLoader", model="tiny", precision="fp32", device="cpu", compile=True)


@pytest.mark.parametrize("height, width, refine_edges, through_apply_alpha", [
    (48, 56, True, True),  # not larger than the processing size: resized, colours refined
    (80, 104, False, True),  # larger, edges not refined
    (80, 104, True, False),  # larger, edges refined: only from the processing-size mask (Apply Alpha gets a MASK
    # at the frame's size, which it can only shrink back)
])
def test_one_cutout_through_the_cli_apply_alpha_and_remove_background(model, official_tiny, tmp_path, height, width,
                                                                      refine_edges, through_apply_alpha):
    """Issue 18: the front ends share the core's cutout, so the same image and settings give the same RGBA
    within one grey level (the CLI computes in 8 bits, the nodes in float)."""
    import numpy as np
    from PIL import Image

    from diffdis_core.cli import main

    frame = (images(batch=1, height=height, width=width, seed=5) * 255).round() / 255  # what an 8-bit file holds
    Image.fromarray((frame[0] * 255).round().to(torch.uint8).numpy()).save(tmp_path / "frame.png")
    options = [] if refine_edges else ["--no-refine-edges"]
    assert main([str(tmp_path / "frame.png"), "--output", str(tmp_path / "out"), "--model", str(official_tiny),
                 "--base", "none", "--processing-res", str(RES), "--seed", "3", "--dtype", "fp32", *options]) == 0
    from_cli = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "frame.png")).astype(np.int32))

    def grey_levels(rgba: torch.Tensor) -> torch.Tensor:
        return (rgba[0] * 255).round().to(torch.int32)

    one_node, _, _ = run("DiffDISRemoveBackground", model=model, image=frame, processing_res=RES, seed=3, tta=False,
                      background="alpha", custom_color="#000000", refine_foreground=True, refine_edges=refine_edges)
    assert (grey_levels(one_node) - from_cli).abs().max() <= 1
    staged_mask, _ = segment(model, frame, seed=3, decode="mask only")
    staged, _ = apply(frame, staged_mask, processing_res=RES, refine_edges=refine_edges)
    close = (grey_levels(staged) - from_cli).abs().max() <= 1
    assert close == through_apply_alpha
