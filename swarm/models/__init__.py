"""Model zoo and model resolution.

A model is named by a preset (``configs/models/<name>.yaml``), a YAML file with a model spec, or an
import path ``package.module:factory``. ``build`` turns a spec into an ``nn.Module`` plus a way to
make example inputs (needed to trace shapes and count FLOPs).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from swarm.config import GPTSpec, ImportSpec, ResNetSpec, config_dir, read_yaml, validate
from swarm.errors import SwarmError
from swarm.models.gpt import GPT
from swarm.models.resnet import ResNet

__all__ = ["GPT", "ResNet", "BuiltModel", "presets", "resolve", "build", "load_model"]


@dataclass
class BuiltModel:
    name: str
    module: nn.Module
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    sequential_modules: list[str] | None = None


_SPECS = {"gpt": GPTSpec, "resnet": ResNetSpec, "import": ImportSpec}


def presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "models").glob("*.yaml"))


def resolve(name: str) -> GPTSpec | ResNetSpec | ImportSpec:
    """Preset name, YAML path or ``package.module:factory`` -> a validated model spec."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
    elif ":" in name:
        return ImportSpec(kind="import", factory=name, name=name)
    else:
        path = config_dir() / "models" / f"{name}.yaml"
        if not path.exists():
            raise SwarmError(f"unknown model '{name}': not a preset ({', '.join(presets())}), "
                             "a .yaml file, or package.module:factory")
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    kind = data.get("kind")
    if kind not in _SPECS:
        raise SwarmError(f"{path}: key 'kind': must be one of {', '.join(_SPECS)} (got {kind!r})")
    return validate(_SPECS[kind], data, str(path))


def _import_factory(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SwarmError(f"model import path '{path}' must look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SwarmError(f"cannot import model module '{module_name}': {e}") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise SwarmError(f"module '{module_name}' has no attribute '{attr}'") from None
    if not callable(factory):
        raise SwarmError(f"model factory '{path}' is not callable")
    return factory


def build(spec: GPTSpec | ResNetSpec | ImportSpec) -> BuiltModel:
    if isinstance(spec, GPTSpec):
        module: nn.Module = GPT(spec.vocab_size, spec.seq_len, spec.n_layer, spec.n_head, spec.d_model,
                                spec.dropout, spec.tie_weights)
    elif isinstance(spec, ResNetSpec):
        module = ResNet(spec.depth, spec.num_classes, spec.image_size, spec.in_channels)
    else:
        try:
            module = _import_factory(spec.factory)(**spec.kwargs)
        except SwarmError:
            raise
        except Exception as e:
            raise SwarmError(f"model factory '{spec.factory}' failed: {type(e).__name__}: {e}") from None
        if not isinstance(module, nn.Module):
            raise SwarmError(f"model factory '{spec.factory}' returned {type(module).__name__}, not torch.nn.Module")
    if hasattr(module, "example_inputs"):
        example = module.example_inputs
    elif isinstance(spec, ImportSpec) and spec.input_shape:
        shape, dtype, high = tuple(spec.input_shape), spec.input_dtype, spec.input_high
        example = (lambda b: (torch.randint(0, high, (b, *shape)),)) if dtype == "int64" else (lambda b: (torch.randn(b, *shape),))
    else:
        def example(batch_size: int) -> tuple[torch.Tensor, ...]:
            raise SwarmError(f"model '{spec.name}' has no example_inputs(batch_size) method; set input_shape in its spec")
    return BuiltModel(spec.name or type(module).__name__, module, example, spec.sequential_modules)


def load_model(name: str) -> BuiltModel:
    return build(resolve(name))


def trace_model(name: str, granularity: str, batch_size: int):
    """Build model ``name`` (seeded, so every node builds the same one) and trace its OP-DAG."""
    from swarm.dag.trace import trace

    torch.manual_seed(0)   # same initial weights in every process
    built = load_model(name)
    return trace(built.module, built.example_inputs(batch_size), granularity, built.sequential_modules, built.name)
