"""Stage extraction: cut a traced model into executable pipeline stages.

Stage ``s`` is a ``GraphModule`` whose positional inputs are ``StageIO.inputs`` (values produced by
earlier stages, including ones that skip over stages: residuals, shortcuts, branches) and which
returns the tuple ``StageIO.outputs``. Parameters are re-read inside the stage that uses them;
a parameter used by two stages is an error (its gradient would be split).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from swarm.dag.graph import Partition, StageIO
from swarm.dag.trace import TracedModel
from swarm.errors import SwarmError


@dataclass
class Stage:
    io: StageIO
    module: fx.GraphModule

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        return self.module(*inputs)


def _stage_graph(gm: fx.GraphModule, io: StageIO) -> fx.Graph:
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[str, fx.Node] = {name: graph.placeholder(name) for name in io.inputs}

    def lookup(n: fx.Node) -> fx.Node:
        if n.name not in env:
            if n.op != "get_attr":  # guaranteed by StageIO; a miss is a bug in the boundary analysis
                raise RuntimeError(f"stage {io.index}: value '{n.name}' is neither an input nor computed here")
            env[n.name] = graph.get_attr(n.target)
        return env[n.name]

    for name in io.ops:
        node = nodes[name]
        if node.op in ("placeholder", "get_attr"):
            continue  # inputs are placeholders already; parameters are fetched where used
        if node.op == "output":
            graph.output((fx.map_arg(node.args[0], lookup),))
            return graph
        env[name] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(nodes[name]) for name in io.outputs))
    return graph


def extract_stages(traced: TracedModel, partition: Partition) -> list[Stage]:
    """One executable module per stage; running them in order equals running the whole model."""
    stages = []
    for io in traced.dag.stage_io(partition):
        graph = _stage_graph(traced.gm, io)
        stages.append(Stage(io, fx.GraphModule(traced.gm, graph, f"Stage{io.index}")))
    owner: dict[int, tuple[int, str]] = {}
    for stage in stages:
        for name, p in stage.module.named_parameters():
            if id(p) in owner and owner[id(p)][0] != stage.io.index:
                first_stage, first_name = owner[id(p)]
                raise SwarmError(f"one parameter ('{first_name}' in stage {first_stage}, '{name}' in stage {stage.io.index}) "
                                 f"is used by stages {first_stage} and {stage.io.index}; "
                                 "keep the ops that share it in one stage (or untie it)")
            owner[id(p)] = (stage.io.index, name)
    return stages


def run_stages(stages: list[Stage], *inputs: Any) -> Any:
    """Run stages in order, passing boundary values by name (what the pipeline does over the wire)."""
    env: dict[str, Any] = dict(zip(stages[0].io.inputs, inputs))
    for stage in stages:
        env.update(zip(stage.io.outputs, stage(*(env[name] for name in stage.io.inputs))))
    return env[stages[-1].io.outputs[0]]


def stage_parameters(stages: list[Stage]) -> dict[str, torch.nn.Parameter]:
    """All parameters by qualified name (the same names as in the original model)."""
    return {name: p for stage in stages for name, p in stage.module.named_parameters()}


def input_specs(dag, io: StageIO) -> list[tuple[list[int], str, bool]]:
    """(traced shape, dtype name, batched) of each input of a stage: what its RPCs accept. A batched
    input (first dim = the traced batch size) may come with any batch size; others (positions, masks)
    must match their traced shape exactly."""
    ops = [dag.ops[dag.index[name]] for name in io.inputs]
    return [(list(op.out_shapes[0]), op.out_dtypes[0].removeprefix("torch."),
             bool(op.out_shapes[0]) and op.out_shapes[0][0] == dag.batch_size) for op in ops]


def model_io(traced: TracedModel) -> tuple[list[int], str, list[int]]:
    """(input shape, input dtype, output shape) of the traced model (batch dimension first)."""
    dag = traced.dag
    first = next(op for op in dag.ops if op.op == "placeholder")
    output = next(op for op in dag.ops if op.op == "output")
    result = dag.ops[dag.index[output.inputs[0]]]
    return list(first.out_shapes[0]), first.out_dtypes[0].removeprefix("torch."), list(result.out_shapes[0])


def frame_limit(traced: TracedModel, max_batch: int, flat_numel: int) -> int:
    """The largest frame a stage can legitimately receive: a boundary's activations (or gradients)
    for ``max_batch`` samples, or a replica's share of the flat gradient, plus headroom."""
    per_sample = max(traced.dag.cut_bytes()) / traced.dag.batch_size
    return int(2 * per_sample * max_batch + 4 * flat_numel + (1 << 20))
