"""Trace a model into an OP-DAG with torch.fx (the only torch.fx tracer in swarm).

Each fx node becomes one operator. ``fine`` keeps torch.fx's default leaves (``nn.Linear``,
``nn.LayerNorm``, ...); ``coarse`` additionally treats every element of an ``nn.ModuleList`` /
``nn.Sequential`` (transformer blocks, residual blocks) as one operator. Models torch.fx cannot
trace can name their top-level modules instead (``sequential_modules``): they run as a chain.

Costs are measured by running the traced graph once on example inputs: torch's FlopCounterMode
counts forward FLOPs, and a local ``autograd.grad`` per operator counts its own backward FLOPs.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import _get_qualified_name
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from swarm.dag.graph import Op, OpDAG
from swarm.errors import SwarmError

GRANULARITIES = ("fine", "coarse")
_aten = torch.ops.aten


def _causal(args: tuple, kwargs: dict, position: int) -> bool:
    return bool(kwargs.get("is_causal", args[position] if len(args) > position else False))


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # (q, k, v, dropout_p, is_causal): the CPU kernel skips fully masked blocks, about half the work
    flops = sdpa_flop_count(query, key, value)
    return flops // 2 if _causal(args, kwargs, 1) else flops


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # (grad_out, q, k, v, out, logsumexp, dropout_p, is_causal)
    flops = sdpa_backward_flop_count(grad_out, query, key, value)
    return flops // 2 if _causal(args, kwargs, 3) else flops


# torch's registry lacks the CPU flash-attention kernels; the counts are torch's own formulas,
# halved for causal masks because this kernel skips the masked half.
EXTRA_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


@dataclass
class TracedModel:
    """The executable graph and its OP-DAG (op names are fx node names)."""

    gm: fx.GraphModule
    dag: OpDAG


def block_names(model: nn.Module) -> set[str]:
    """Qualified names of the outermost elements of ModuleList/Sequential containers."""
    blocks: set[str] = set()
    for name, module in model.named_modules():
        if any(name == b or name.startswith(b + ".") for b in blocks):
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            blocks.update(f"{name}.{child}" if name else child for child, _ in module.named_children())
    return blocks


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def to_graph_module(model: nn.Module, granularity: str = "coarse",
                    sequential_modules: list[str] | None = None, name: str = "") -> fx.GraphModule:
    """Symbolically trace ``model`` (or chain ``sequential_modules``) into a GraphModule."""
    if granularity not in GRANULARITIES:
        raise SwarmError(f"unknown granularity '{granularity}' (choose {' or '.join(GRANULARITIES)})")
    if sequential_modules:
        graph = fx.Graph()
        x = graph.placeholder("x")
        for qualname in sequential_modules:
            try:
                model.get_submodule(qualname)
            except AttributeError:
                raise SwarmError(f"sequential_modules: model {name or type(model).__name__} has no module '{qualname}'") from None
            x = graph.call_module(qualname, (x,))
        graph.output(x)
        return fx.GraphModule(model, graph, type(model).__name__)
    tracer = _Tracer(block_names(model) if granularity == "coarse" else set())
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ... for dynamic code
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SwarmError(f"torch.fx cannot trace model {name or type(model).__name__} ({reason}); list its top-level "
                         "modules under sequential_modules in the model spec (docs/architecture.md)") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _KernelMeter(TorchDispatchMode):
    """Counts aten kernels, bytes moved by memory-bound kernels, and matmul-like FLOPs by size."""

    def __init__(self, flop_registry: dict):
        super().__init__()
        self.registry = flop_registry
        self.kernels = 0
        self.mem_bytes = 0
        self.flops_by_size: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.kernels += 1
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            if flops:  # size of the equivalent square matmul: 2 n^3 = flops
                self.flops_by_size[round(math.log2(max(flops / 2, 1) ** (1 / 3)))] += flops
        elif not func.is_view:
            seen = {id(t): t for t in _tensors((args, kwargs, out))}
            self.mem_bytes += sum(_nbytes(t) for t in seen.values())
        return out


class _Measure:
    """Forward or backward counters for one operator."""

    def __enter__(self) -> _Measure:
        self.flops = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        self.flops.__enter__()
        self.meter = _KernelMeter(self.flops.flop_registry)
        self.meter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.meter.__exit__(*exc)
        self.flops.__exit__(*exc)


class _Profiler(fx.Interpreter):
    """Runs the graph once with autograd on, recording shapes and costs per node."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.ops: list[Op] = []
        self.owned: set[int] = set()  # parameters already attributed (shared ones count once)
        self.param_storages = {p.untyped_storage().data_ptr() for p in gm.parameters()}
        self.saved_storages: set[int] = set()

    def _owned_params(self, n: fx.Node) -> tuple[list[str], list[torch.Tensor], int]:
        if n.op == "call_module":
            named = [(f"{n.target}.{k}", p) for k, p in self.module.get_submodule(n.target).named_parameters()]
            buffers = sum(_nbytes(b) for b in self.module.get_submodule(n.target).buffers())
        elif n.op == "get_attr":
            attr = self.fetch_attr(n.target)
            named = [(n.target, attr)] if isinstance(attr, nn.Parameter) else []
            buffers = _nbytes(attr) if isinstance(attr, torch.Tensor) and not named else 0
        else:
            return [], [], 0
        fresh = [(k, p) for k, p in named if id(p) not in self.owned]
        self.owned.update(id(p) for _, p in fresh)
        return [k for k, _ in fresh], [p for _, p in fresh], buffers

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.param_storages and ptr not in self.saved_storages:
            self.saved_storages.add(ptr)
            self.act_bytes += t.untyped_storage().nbytes()
        return t

    def _measure_backward(self, n: fx.Node, params: list[torch.Tensor]) -> _Measure:
        """Backward of this op alone: re-run it on fresh leaves so autograd stops at its inputs."""
        leaves: list[torch.Tensor] = []

        def fresh(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                leaves.append(t.detach().requires_grad_())
                return leaves[-1].clone()  # a non-leaf, so in-place ops stay legal
            return t

        args, kwargs = tree_map(fresh, self.fetch_args_kwargs_from_env(n))
        outs = [t for t in _tensors(getattr(self, n.op)(n.target, args, kwargs)) if t.requires_grad]
        with _Measure() as bwd:
            torch.autograd.grad(outs, leaves + params, [torch.ones_like(t) for t in outs], allow_unused=True)
        return bwd

    def run_node(self, n: fx.Node) -> Any:
        names, params, buffer_bytes = self._owned_params(n)
        self.act_bytes = 0
        with _Measure() as fwd, torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            result = super().run_node(n)
        flops_bwd = mem_bwd = kernels_bwd = 0
        by_size = Counter(fwd.meter.flops_by_size)
        if n.op.startswith("call_") and any(t.requires_grad for t in _tensors(result)):
            bwd = self._measure_backward(n, params)
            flops_bwd, mem_bwd, kernels_bwd = bwd.flops.get_total_flops(), bwd.meter.mem_bytes, bwd.meter.kernels
            by_size.update(bwd.meter.flops_by_size)
        out_tensors = _tensors(result) if n.op not in ("output", "get_attr") else []
        self.ops.append(Op(
            name=n.name, kind=_kind(self.module, n), op=n.op, target=_target(n),
            inputs=[i.name for i in n.all_input_nodes],
            out_shapes=[list(t.shape) for t in out_tensors], out_dtypes=[str(t.dtype).removeprefix("torch.") for t in out_tensors],
            out_bytes=sum(_nbytes(t) for t in out_tensors),
            params=names, n_params=sum(p.numel() for p in params), param_bytes=sum(_nbytes(p) for p in params), buffer_bytes=buffer_bytes,
            act_bytes=self.act_bytes, flops_fwd=fwd.flops.get_total_flops(), flops_bwd=flops_bwd,
            mem_bytes_fwd=fwd.meter.mem_bytes, mem_bytes_bwd=mem_bwd,
            kernels_fwd=fwd.meter.kernels, kernels_bwd=kernels_bwd, flops_by_size=dict(sorted(by_size.items())),
        ))
        return result


def _kind(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    return {"placeholder": "input", "output": "output", "get_attr": "param"}.get(n.op, str(n.target))


def _target(n: fx.Node) -> str:
    return _get_qualified_name(n.target) if n.op == "call_function" else str(n.target)


def trace(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], granularity: str = "coarse",
          sequential_modules: list[str] | None = None, name: str = "") -> TracedModel:
    """Trace ``model`` and measure every operator on ``example_inputs`` (batch = their first dim)."""
    gm = to_graph_module(model, granularity, sequential_modules, name)
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_inputs != len(example_inputs):
        raise SwarmError(f"model {name or type(model).__name__} takes {n_inputs} inputs, example has {len(example_inputs)}")
    profiler = _Profiler(gm)
    buffers = {k: v.clone() for k, v in gm.named_buffers()}  # profiling must not touch BatchNorm stats
    with torch.enable_grad(), torch.random.fork_rng():
        try:
            profiler.run(*example_inputs)
        except SwarmError:
            raise
        except Exception as e:
            raise SwarmError(f"running traced model {name or type(model).__name__} failed: {type(e).__name__}: {e}") from None
        finally:
            with torch.no_grad():
                for k, v in gm.named_buffers():
                    v.copy_(buffers[k])
    batch = int(example_inputs[0].shape[0]) if example_inputs and example_inputs[0].dim() else 1
    return TracedModel(gm, OpDAG(profiler.ops, name or type(model).__name__, "manual" if sequential_modules else granularity, batch))
