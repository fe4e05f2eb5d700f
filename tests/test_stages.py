"""Running the extracted stages in sequence must equal the whole model: outputs and every gradient."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.config import GPTSpec
from swarm.dag.graph import Partition
from swarm.dag.stages import extract_stages, run_stages, stage_parameters
from swarm.dag.trace import trace
from swarm.errors import SwarmError
from swarm.models import build, load_model


def loss_of(out):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o.float() ** 2).mean() for o in outs)


def reference(model, inputs):
    ref = copy.deepcopy(model)
    out = ref(*inputs)
    loss_of(out).backward()
    return ref, out


def check_composition(model, inputs, partition_for, granularity="coarse", sequential_modules=None, tol=1e-6):
    torch.manual_seed(0)
    ref, ref_out = reference(model, inputs)
    traced = trace(model, inputs, granularity, sequential_modules)
    for partition in partition_for(len(traced.dag)):
        model.zero_grad(set_to_none=True)
        stages = extract_stages(traced, partition)
        out = run_stages(stages, *inputs)
        loss_of(out).backward()
        for a, b in zip(out if isinstance(out, tuple) else (out,), ref_out if isinstance(ref_out, tuple) else (ref_out,)):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        params = stage_parameters(stages)
        assert set(params) == {n for n, _ in ref.named_parameters()}
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name].grad, p.grad, atol=tol, rtol=tol, msg=f"gradient of {name}")
    return traced


def even_partitions(n_ops):
    return [Partition.even(n_ops, k) for k in (1, 2, 3, 5) if k <= n_ops]


@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_gpt_stages_equal_whole_model(granularity):
    built = load_model("gpt2-tiny")
    check_composition(built.module, built.example_inputs(2), even_partitions, granularity)


@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_resnet_with_batchnorm_stages_equal_whole_model(granularity):
    built = load_model("resnet18")
    built.module.train()
    check_composition(built.module, built.example_inputs(4), even_partitions, granularity, tol=1e-5)


def test_resnet50_bottlenecks():
    built = load_model("resnet50")
    check_composition(built.module, built.example_inputs(2), lambda n: [Partition.even(n, 4)], "coarse", tol=1e-5)


def test_user_model_with_branches_every_single_cut():
    built = load_model("tests.user_models:branchy")
    inputs = built.example_inputs(6)
    traced = check_composition(built.module, inputs, lambda n: [Partition((0, c), n) for c in range(2, n)], "fine")
    # the skip tensor crosses every cut between its producer and the final add
    crossing = [traced.dag.crossing(c) for c in range(len(traced.dag))]
    assert sum("mul" in names for names in crossing) >= 5


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_random_partitions_of_branchy_model(data):
    built = load_model("tests.user_models:branchy")
    inputs = built.example_inputs(5)

    def random_partition(n):
        # the first stage must hold both model inputs (ops 0 and 1)
        cuts = data.draw(st.sets(st.integers(2, n - 1), max_size=6))
        return [Partition((0, *sorted(cuts)), n)]

    check_composition(built.module, inputs, random_partition, "fine")


def test_sequential_fallback_stages():
    built = load_model("tests.user_models:untraceable")
    x = (torch.rand(3, 4),)
    check_composition(built.module, x, lambda n: [Partition((0, 2), n)], sequential_modules=["first", "second"])


def test_tied_weights_across_stages_are_refused():
    model = build(GPTSpec(kind="gpt", n_layer=2, d_model=32, n_head=2, seq_len=16, tie_weights=True)).module
    traced = trace(model, (torch.randint(0, 256, (1, 16)),))
    with pytest.raises(SwarmError, match=r"one parameter \('wte.weight' in stage 0, 'lm_head.weight' in stage 1\) "
                       r"is used by stages 0 and 1"):
        extract_stages(traced, Partition.even(len(traced.dag), 2))


def test_model_inputs_must_be_in_first_stage():
    built = load_model("tests.user_models:branchy")
    traced = trace(built.module, built.example_inputs(2), "fine")
    with pytest.raises(SwarmError, match="every model input must be in the first stage"):
        extract_stages(traced, Partition((0, 1), len(traced.dag)))
