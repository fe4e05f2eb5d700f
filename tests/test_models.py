import pytest
import torch

from swarm.config import GPTSpec, ImportSpec
from swarm.errors import SwarmError
from swarm.models import build, load_model, presets, resolve


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_presets_exist_and_build():
    assert {"gpt2-tiny", "gpt2-small", "gpt2-medium", "resnet18", "resnet50", "resnet101"} <= set(presets())
    tiny = load_model("gpt2-tiny")
    assert 1e6 < n_params(tiny.module) < 10e6  # "a few M params"
    (idx,) = tiny.example_inputs(2)
    assert tiny.module(idx).shape == (2, 128, 256)


def test_gpt2_small_shape_matches_gpt2():
    spec = resolve("gpt2-small")
    assert isinstance(spec, GPTSpec)
    with torch.device("meta"):
        model = build(spec.model_copy(update={"tie_weights": True})).module
    assert abs(n_params(model) - 124.4e6) < 0.5e6  # GPT-2 small with tied embeddings


@pytest.mark.parametrize("depth, millions", [(18, 11.17), (50, 23.52)])
def test_resnet_sizes_and_output(depth, millions):
    built = load_model(f"resnet{depth}")
    assert abs(n_params(built.module) / 1e6 - millions) < 0.05
    assert built.module(*built.example_inputs(2)).shape == (2, 10)


def test_model_by_import_path():
    built = load_model("tests.user_models:branchy")
    assert isinstance(spec := resolve("tests.user_models:branchy"), ImportSpec) and spec.factory.endswith(":branchy")
    out, aux = built.module(*built.example_inputs(3))
    assert out.shape == (3, 4) and aux.shape == (3,)


@pytest.mark.parametrize("name, message", [
    ("gpt9", "unknown model 'gpt9'"),
    ("no_such_module_xyz:make", "cannot import model module 'no_such_module_xyz'"),
    ("tests.user_models:missing", "has no attribute 'missing'"),
    ("tests.user_models:not_a_module", "returned int, not torch.nn.Module"),
    ("tests.user_models:", "must look like package.module:factory"),
])
def test_bad_model_names(name, message):
    with pytest.raises(SwarmError, match=message):
        load_model(name)


def test_model_yaml_errors_name_the_key(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("kind: gpt\nn_layers: 3\n")
    with pytest.raises(SwarmError, match=r"m.yaml: key 'n_layers': unknown key"):
        resolve(str(path))
    path.write_text("kind: transformer\n")
    with pytest.raises(SwarmError, match=r"key 'kind': must be one of gpt, resnet, import"):
        resolve(str(path))


def test_import_spec_input_shape_gives_example_inputs():
    spec = ImportSpec(kind="import", factory="tests.user_models:bare", input_shape=[4])
    assert build(spec).example_inputs(3)[0].shape == (3, 4)
    with pytest.raises(SwarmError, match="has no example_inputs"):
        load_model("tests.user_models:bare").example_inputs(3)


def test_every_process_builds_the_same_initial_weights():
    import subprocess
    import sys

    code = ("import torch, hashlib; from swarm.models import trace_model; gm = trace_model('gpt2-tiny', 'coarse', 1).gm; "
            "print(hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in gm.parameters())).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout for _ in range(2)}
    assert len(digests) == 1 and len(next(iter(digests))) == 65
