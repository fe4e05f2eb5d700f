"""Model zoo and model resolution.

A model is named by a preset (``configs/models/<name>.yaml``), a YAML file with a model spec, or an
import path ``package.module:factory``. ``build`` turns a spec into an ``nn.Module`` plus a way to
make example inputs (needed to trace shapes and count FLOPs).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swarm.config import GPTSpec, HFSpec, ImportSpec, ResNetSpec, config_dir, read_yaml, validate
from swarm.errors import SwarmError
from swarm.imports import describe, import_callable
from swarm.models.gpt import GPT
from swarm.models.resnet import ResNet
from swarm.userdata import example_inputs, is_factory

__all__ = ["GPT", "ResNet", "BuiltModel", "presets", "resolve", "build", "load_model"]


@dataclass
class BuiltModel:
    name: str
    module: nn.Module
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    sequential_modules: list[str] | None = None


SPECS = {"gpt": GPTSpec, "resnet": ResNetSpec, "import": ImportSpec, "hf": HFSpec}
Spec = GPTSpec | ResNetSpec | ImportSpec | HFSpec


def presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "models").glob("*.yaml"))


def resolve(name: str) -> Spec:
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
    if kind not in SPECS:
        raise SwarmError(f"{path}: key 'kind': must be one of {', '.join(SPECS)} (got {kind!r})")
    if kind == "hf" and isinstance(data.get("path"), str):   # relative to the YAML file
        data["path"] = str((path.parent / data["path"]).resolve())
    return validate(SPECS[kind], data, str(path))


def _param_bytes(spec: GPTSpec | ResNetSpec) -> int:
    """Bytes of the parameters the spec asks for (float32), known before building: GPT blocks hold
    12 d^2 each plus the embeddings and the head; a ResNet's size is its depth's plus the classifier."""
    if isinstance(spec, GPTSpec):
        d = spec.d_model
        return 4 * (12 * spec.n_layer * d * d + (2 * spec.vocab_size + spec.seq_len) * d)
    return 4 * (45_000_000 + 2048 * spec.num_classes)   # ResNet-101's convolutions, the widest classifier


def _check_fits(what: str, need: int, hint: str) -> None:
    """Refuse, in one line, what certainly does not fit the memory available here."""
    from swarm.estimator.profile import _memory

    available = _memory("cpu")[1]   # models are built and traced on the CPU
    if need > available:
        raise SwarmError(f"{what} needs about {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
                         f"of memory available on this machine; {hint}")


def _build_hf(spec: HFSpec) -> BuiltModel:
    from swarm.models.hf import HFCausalLM, load_config, load_hf, max_positions

    seq_len = spec.seq_len or min(max_positions(load_config(spec.path)), 1024)
    module = HFCausalLM(load_hf(spec.path, spec.weights, spec.seed), seq_len)
    return BuiltModel(spec.name or Path(spec.path).name, module, module.example_inputs, module.block_names())


def build(spec: Spec, data=None, input_shape: list[int] | None = None) -> BuiltModel:
    """The model of ``spec``; its example inputs from the module, the spec's ``input_shape`` (or the
    node's, ``input_shape``), or else the data factory ``data`` names (``training.data``, ``swarm.userdata``)."""
    if isinstance(spec, ImportSpec) and input_shape and not spec.input_shape:
        spec = spec.model_copy(update={"input_shape": list(input_shape)})
    if isinstance(spec, HFSpec):
        return _build_hf(spec)
    if not isinstance(spec, ImportSpec):
        _check_fits(f"model '{spec.name or spec.kind}' ({_param_bytes(spec) // 4:,} parameters)", _param_bytes(spec),
                    "make it smaller")
    if isinstance(spec, GPTSpec):
        module: nn.Module = GPT(spec.vocab_size, spec.seq_len, spec.n_layer, spec.n_head, spec.d_model,
                                spec.dropout, spec.tie_weights)
    elif isinstance(spec, ResNetSpec):
        module = ResNet(spec.depth, spec.num_classes, spec.image_size, spec.in_channels)
    else:
        try:
            module = import_callable(spec.factory)(**spec.kwargs)
        except SwarmError:
            raise
        except BaseException as e:   # SystemExit(0) too: a factory that exits must not end the node with "success"
            raise SwarmError(f"model factory '{spec.factory}' failed: {describe(e)}") from None
        if not isinstance(module, nn.Module):
            raise SwarmError(f"model factory '{spec.factory}' returned {type(module).__name__}, not torch.nn.Module")
    if hasattr(module, "example_inputs"):
        example = module.example_inputs
    elif isinstance(spec, ImportSpec) and spec.input_shape:
        shape, dtype, high = tuple(spec.input_shape), spec.input_dtype, spec.input_high
        example = (lambda b: (torch.randint(0, high, (b, *shape)),)) if dtype == "int64" else (lambda b: (torch.randn(b, *shape),))
    elif is_factory(data):
        example = example_inputs(data)
    else:
        def example(batch_size: int) -> tuple[torch.Tensor, ...]:
            raise SwarmError(f"model '{spec.name}' has no example_inputs(batch_size) method; set input_shape in its "
                             "spec or the node config (--input-shape), or name a data factory in training.data")
    return BuiltModel(spec.name or type(module).__name__, module, example, spec.sequential_modules)


def load_model(name: str, data=None, input_shape: list[int] | None = None) -> BuiltModel:
    return build(resolve(name), data, input_shape)


def sample_bytes(built: BuiltModel, probe: int = 1) -> tuple[int, int]:
    """(activation bytes, input bytes) per sample: what autograd saves for backward in one training
    forward pass of ``probe`` samples (parameters excluded, each storage once), divided by ``probe``.
    The model is left as it was (buffers such as BatchNorm statistics and the RNG are restored)."""
    module = built.module
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]):
            inputs = built.example_inputs(probe)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = module(*inputs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            out_bytes = sum(o.numel() * o.element_size() for o in outs if torch.is_tensor(o))
            del out, outs
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
    in_bytes = sum(t.numel() * t.element_size() for t in inputs if torch.is_tensor(t))
    return (sum(saved.values()) + out_bytes) // probe, in_bytes // probe


def check_batch_memory(built: BuiltModel, micro_batch_size: int, micro_batches: int = 1) -> None:
    """A micro-batch of ``micro_batch_size`` samples of the whole model (what tracing runs, and what a
    node holding the model trains) and a step's inputs (``micro_batches`` of them) must fit this
    machine's memory: else a one-line error, before anything that large is allocated. A single
    sample is not checked (the probe itself is one)."""
    if micro_batch_size * micro_batches <= 1:
        return
    try:
        act, inp = sample_bytes(built)
    except (Exception, SystemExit):   # e.g. BatchNorm over a single value: probe two samples
        act, inp = sample_bytes(built, 2)
    step = f" in a step of {micro_batches} micro-batches" if micro_batches > 1 else ""
    _check_fits(f"a micro-batch of {micro_batch_size} samples of model '{built.name}' "
                f"({act / 2**20:.2f} MiB of activations per sample){step}",
                act * micro_batch_size + inp * micro_batch_size * micro_batches,
                "lower micro_batch_size (or election.micro_batches)")


def trace_model(name: str, granularity: str, batch_size: int, micro_batches: int = 1, data=None,
                input_shape: list[int] | None = None):
    """Build model ``name`` (seeded, so every node builds the same one) and trace its OP-DAG, once a
    micro-batch of ``batch_size`` (and a step of ``micro_batches`` of them) is known to fit in memory."""
    from swarm.dag.trace import trace

    torch.manual_seed(0)   # same initial weights in every process
    built = load_model(name, data, input_shape)
    try:
        check_batch_memory(built, batch_size, micro_batches)
        return trace(built.module, built.example_inputs(batch_size), granularity, built.sequential_modules, built.name)
    except SwarmError:
        raise
    except (Exception, SystemExit) as e:   # the model's own code (forward, example_inputs)
        raise SwarmError(f"model '{built.name}' failed on example inputs: {describe(e)}") from None
