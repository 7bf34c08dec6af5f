"""A stand-in for the few pieces of ComfyUI's V3 node API (``comfy_api.latest``) the pack uses, for the
tests that run without ComfyUI (the real module imports ComfyUI's server, execution and arguments).

It only records what the nodes declare, taking a subset of the constructor arguments ComfyUI 0.8 and
0.21 both take (anything else fails here too), and gives ComfyUI's classic view of a node
(``INPUT_TYPES``, ``RETURN_TYPES``...) the way ComfyUI builds it for /object_info and validation.
tests/test_comfyui_integration.py compares that view of every node with a real ComfyUI's
/object_info, so the stand-in cannot drift from the real API unnoticed.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
from abc import ABC, abstractmethod


def _pruned(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}


class _Input:
    io_type: str

    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip

    def as_dict(self) -> dict:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip})


class _WidgetInput(_Input):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 default=None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip)
        self.default, self.force_input = default, force_input

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"default": self.default, "forceInput": self.force_input})


class _Output:
    io_type: str

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list: bool = False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name or id, tooltip, is_output_list


def _comfy_type(io_type: str, input_class: type = _Input) -> type:
    """A ComfyType: its Input and Output classes carry ``io_type``."""
    return type(io_type.title(), (), {"io_type": io_type,
                                      "Input": type("Input", (input_class,), {"io_type": io_type}),
                                      "Output": type("Output", (_Output,), {"io_type": io_type})})


class _IntInput(_WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 default: int = None, min: int = None, max: int = None, step: int = None,
                 control_after_generate: bool = None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip, default, force_input)
        self.min, self.max, self.step, self.control_after_generate = min, max, step, control_after_generate

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"min": self.min, "max": self.max, "step": self.step,
                                            "control_after_generate": self.control_after_generate})


class _FloatInput(_WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 default: float = None, min: float = None, max: float = None, step: float = None,
                 round: float = None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip, default, force_input)
        self.min, self.max, self.step, self.round = min, max, step, round

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"min": self.min, "max": self.max, "step": self.step, "round": self.round})


class _BooleanInput(_WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 default: bool = None, label_on: str = None, label_off: str = None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip, default, force_input)
        self.label_on, self.label_off = label_on, label_off

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"label_on": self.label_on, "label_off": self.label_off})


class _StringInput(_WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 multiline: bool = False, placeholder: str = None, default: str = None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip, default, force_input)
        self.multiline, self.placeholder = multiline, placeholder

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"multiline": self.multiline, "placeholder": self.placeholder})


class _ComboInput(_WidgetInput):
    def __init__(self, id: str, options: list = None, display_name: str = None, optional: bool = False,
                 tooltip: str = None, default=None):
        super().__init__(id, display_name, optional, tooltip, default)
        self.options = options

    def as_dict(self) -> dict:
        return super().as_dict() | {"multiselect": False, "options": self.options}


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"


@dataclasses.dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    hidden: list = dataclasses.field(default_factory=list)
    description: str = ""
    search_aliases: list = dataclasses.field(default_factory=list)


class NodeOutput:
    def __init__(self, *args):
        self.args = args

    @property
    def result(self):
        return self.args or None


class _ClassProperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


class ComfyNode:
    hidden = None  # ComfyUI sets the hidden inputs' values on a copy of the class for each run

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    # ComfyUI's classic view of the schema (its V1 compatibility layer).
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        schema = cls.define_schema()
        types_ = {"required": {}}
        for declared in schema.inputs:
            types_.setdefault("optional" if declared.optional else "required", {})[declared.id] = (
                declared.io_type, declared.as_dict())
        if schema.hidden:
            types_["hidden"] = {hidden.name: (hidden.value,) for hidden in schema.hidden}
        return types_

    DESCRIPTION = _ClassProperty(lambda cls: cls.define_schema().description)
    CATEGORY = _ClassProperty(lambda cls: cls.define_schema().category)
    RETURN_TYPES = _ClassProperty(lambda cls: [o.io_type for o in cls.define_schema().outputs])
    RETURN_NAMES = _ClassProperty(lambda cls: [o.display_name or o.io_type for o in cls.define_schema().outputs])
    OUTPUT_TOOLTIPS = _ClassProperty(lambda cls: [o.tooltip for o in cls.define_schema().outputs])


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        pass

    @abstractmethod
    async def get_node_list(self) -> list[type[ComfyNode]]:
        ...


def Custom(io_type: str) -> type:  # noqa: N802 (ComfyUI's name)
    return _comfy_type(io_type)


IO = types.SimpleNamespace(
    ComfyNode=ComfyNode, Schema=Schema, NodeOutput=NodeOutput, Hidden=Hidden, Custom=Custom,
    Input=_Input, Output=_Output,
    Int=_comfy_type("INT", _IntInput), Float=_comfy_type("FLOAT", _FloatInput),
    Boolean=_comfy_type("BOOLEAN", _BooleanInput), String=_comfy_type("STRING", _StringInput),
    Combo=_comfy_type("COMBO", _ComboInput), Image=_comfy_type("IMAGE"), Mask=_comfy_type("MASK"))


def install() -> None:
    """Make ``comfy_api.latest`` importable as this stand-in (the pack imports it by that name)."""
    latest = types.ModuleType("comfy_api.latest")
    latest.IO, latest.ComfyExtension = IO, ComfyExtension
    package = types.ModuleType("comfy_api")
    package.__path__ = []  # a package, so importlib finds its submodule in sys.modules
    package.latest = latest
    sys.modules["comfy_api"], sys.modules["comfy_api.latest"] = package, latest
