import json

import pytest
import torch

from swarm.dag.graph import Op, OpDAG, Partition
from swarm.dag.trace import block_names, trace
from swarm.errors import SwarmError
from swarm.models import load_model


@pytest.fixture(scope="module")
def tiny():
    built = load_model("gpt2-tiny")
    torch.manual_seed(0)
    x = built.example_inputs(2)
    return built, x, {g: trace(built.module, x, g, name="gpt2-tiny").dag for g in ("coarse", "fine")}


def test_coarse_ops_are_blocks(tiny):
    _, _, dags = tiny
    coarse = dags["coarse"]
    kinds = [op.kind for op in coarse.ops]
    assert kinds.count("Block") == 4 and kinds[0] == "input" and kinds[-1] == "output"
    assert len(dags["fine"]) > 5 * len(coarse)


def test_flops_match_both_granularities_and_the_textbook_count(tiny):
    built, x, dags = tiny
    coarse, fine = dags["coarse"], dags["fine"]
    assert coarse.total_flops == fine.total_flops
    # forward: 2 FLOPs per parameter per token for every matmul weight, backward twice that
    tokens = x[0].numel()
    matmul_params = sum(p.numel() for n, p in built.module.named_parameters() if p.dim() == 2 and not n.startswith(("wte", "wpe")))
    fwd = sum(op.flops_fwd for op in coarse.ops)
    bwd = sum(op.flops_bwd for op in coarse.ops)
    assert 1.0 <= fwd / (2 * matmul_params * tokens) < 1.15  # + causal attention
    assert 1.9 < bwd / fwd < 2.1


def test_shapes_bytes_and_params(tiny):
    built, _, dags = tiny
    dag = dags["coarse"]
    block = dag.ops[dag.index["blocks_0"]]
    assert block.out_shapes == [[2, 128, 256]] and block.out_dtypes == ["float32"]
    assert block.out_bytes == 2 * 128 * 256 * 4
    assert block.param_bytes == sum(p.numel() * 4 for p in built.module.blocks[0].parameters())
    assert block.act_bytes > block.out_bytes  # saved activations dominate the boundary tensor
    assert dag.param_bytes == sum(p.numel() * 4 for p in built.module.parameters())
    assert dags["fine"].param_bytes == dag.param_bytes


def test_json_round_trip(tiny):
    dag = tiny[2]["fine"]
    data = json.loads(dag.to_json())
    assert {"name", "kind", "inputs", "flops", "param_bytes", "out_bytes"} <= set(data["ops"][0])
    assert data["total_flops"] == dag.total_flops
    again = OpDAG.from_json(dag.to_json())
    assert again.to_dict() == dag.to_dict()


def test_cut_bytes_equals_brute_force(tiny):
    for dag in tiny[2].values():
        cuts = dag.cut_bytes()
        for cut in range(len(dag)):
            assert cuts[cut] == sum(dag.ops[dag.index[v]].out_bytes for v in dag.crossing(cut))


def test_valid_cuts_carry_only_tensors(tiny):
    dag = tiny[2]["coarse"]
    valid = dag.valid_cuts()
    assert not valid[dag.index["size"]]  # an int (the sequence length) would cross
    assert valid[dag.index["blocks_1"]] and not valid[-1] and not valid[-2]


def test_dag_rejects_use_before_definition():
    with pytest.raises(SwarmError, match="reads 'b', which is not defined before it"):
        OpDAG([Op("a", "input", "placeholder", "a"), Op("c", "add", "call_function", "add", inputs=["b"]),
               Op("b", "input", "placeholder", "b")])
    with pytest.raises(SwarmError, match="malformed OP-DAG JSON"):
        OpDAG.from_json('{"ops": [{"kind": "x"}]}')


def test_partitions():
    assert Partition.even(10, 3).ranges() == [range(0, 3), range(3, 6), range(6, 10)]
    assert Partition.from_sizes([2, 5, 1]).starts == (0, 2, 7)
    for bad in ((0, 0, 3), (1, 4), (0, 12)):
        with pytest.raises(SwarmError, match="invalid partition"):
            Partition(bad, 10)
    with pytest.raises(SwarmError, match="cannot cut 3 ops into 4 stages"):
        Partition.even(3, 4)


def test_block_names_are_outermost_container_elements():
    resnet = load_model("resnet18").module
    names = block_names(resnet)
    assert "layers.0" in names and "stem.0" in names and "layers.1.body.0" not in names


def test_untraceable_model_gets_one_line_error_and_manual_fallback():
    built = load_model("tests.user_models:untraceable")
    x = (torch.randn(3, 4),)
    with pytest.raises(SwarmError) as err:
        trace(built.module, x, name="untraceable")
    assert "torch.fx cannot trace model untraceable" in str(err.value) and "sequential_modules" in str(err.value)
    assert "\n" not in str(err.value)
    dag = trace(built.module, x, sequential_modules=["first", "second"]).dag
    assert [op.kind for op in dag.ops] == ["input", "Linear", "Linear", "output"]
    with pytest.raises(SwarmError, match="has no module 'third'"):
        trace(built.module, x, sequential_modules=["first", "third"])


def test_tracing_leaves_model_state_alone():
    built = load_model("resnet18")
    before = {k: v.clone() for k, v in built.module.state_dict().items()}
    trace(built.module, built.example_inputs(2))
    assert all(torch.equal(before[k], v) for k, v in built.module.state_dict().items())
    assert all(p.grad is None for p in built.module.parameters())


def test_balanced_partition_uses_valid_cuts_and_balances_flops(tiny):
    dag = tiny[2]["coarse"]
    valid = dag.valid_cuts()
    partition = dag.balanced_partition(4)
    assert partition.n_stages == 4
    assert all(valid[start - 1] for start in partition.starts[1:])
    flops = [sum(dag.ops[i].flops for i in r) for r in partition.ranges()]
    assert max(flops) <= 2 * dag.ops[dag.index["blocks_0"]].flops  # no stage holds more than two blocks
