"""``recompute: off | auto | on`` and ``memory_limit_gb`` (issue 19, part 2): a recomputing stage keeps
only its boundary tensors per micro-batch and runs its forward again in backward, with the same
results; a node capped below what its stage needs without recomputation gets a plan that recomputes,
and its measured peak stays under the cap, where the same stage without recomputation passes it.
``device: cuda:N`` resolves per index; CUDA checks skip on a machine without one."""
import json
import subprocess
import sys

import pytest
import torch

from swarm.config import NodeConfig
from swarm.data import lm_loss
from swarm.errors import SwarmError
from swarm.estimator.profile import resolve_device
from swarm.models import trace_model
from swarm.runtime.local import LocalPipeline, local_servers
from swarm.runtime.memory import MemoryGauge
from swarm.scheduler import PlanSettings
from tests.conftest import config_error

LONG_GPT = "kind: gpt\nseq_len: 512\nd_model: 64\nn_layer: 4\nn_head: 4\n"   # activations >> parameters


def _train(recompute: bool, stages: int = 3):
    torch.manual_seed(0)
    traced = trace_model("gpt2-tiny", "coarse", 4)
    workers = [s.worker for s in local_servers(traced, stages, lm_loss, recompute=recompute)]
    data = torch.randint(0, 256, (8, 129), generator=torch.Generator().manual_seed(1))
    losses = [LocalPipeline(workers, "gpipe").train_step(data[:, :-1], data[:, 1:], 2) for _ in range(2)]
    return losses, [p.detach().clone() for w in workers for p in w.params], workers


def test_recomputed_stages_train_exactly_like_stages_that_keep_their_activations():
    losses, params, workers = _train(False)
    losses_rc, params_rc, workers_rc = _train(True)
    assert all(w.compute.recompute for w in workers_rc) and not any(w.compute.recompute for w in workers)
    assert losses_rc == pytest.approx(losses, rel=1e-6) and losses[1] < losses[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params, params_rc))


def _probe(model, *flags):
    done = subprocess.run([sys.executable, "-m", "tests.memory_probe", str(model), *flags], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_capped_node_gets_a_recomputing_plan_and_stays_under_its_cap(tmp_path):
    """One node holds the whole model (GPipe: all 4 micro-batches in flight), capped halfway between
    what its stage needs with recomputation and without (both as the planner predicts them)."""
    model = tmp_path / "long.yaml"
    model.write_text(LONG_GPT)
    capped = _probe(model)
    assert capped["feasible"] == {"auto": True, "off": False}   # without recomputation no plan fits the cap
    assert capped["plan_recompute"] and capped["recompute"]
    assert capped["planned"] <= capped["advertised"] == capped["limit"] - capped["used_at_start"]
    assert capped["peak"] <= capped["limit"] and capped["over"] is None        # measured: RSS at its peak
    assert capped["peak"] - capped["used_at_start"] <= capped["planned"]     # and the prediction held
    plain = _probe(model, "--force-off")   # the same stage keeping its activations passes the cap, and says so
    assert not plain["recompute"] and plain["peak"] > plain["limit"]
    assert plain["peak"] - plain["used_at_start"] <= plain["need_plain"]
    assert "memory_limit_gb" in plain["over"] and "\n" not in plain["over"]
    assert plain["losses"] == pytest.approx(capped["losses"], rel=1e-6)


def test_recompute_settings_are_checked_in_one_line(tmp_path):
    assert "recompute" in config_error(tmp_path, "recompute: sometimes\n")
    with pytest.raises(SwarmError, match="unknown recompute 'always'"):
        PlanSettings(recompute="always")
    assert NodeConfig().recompute == PlanSettings.recompute == "auto"


def test_devices_resolve_per_index_and_a_device_torch_cannot_see_is_one_line(tmp_path):
    assert resolve_device("cpu") == "cpu"
    assert NodeConfig(device="cuda:1").device == "cuda:1"
    assert "device" in config_error(tmp_path, "device: gpu0\n")
    done = subprocess.run([sys.executable, "node.py", "profile", "--device", "cuda:x"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "not a device" in done.stderr and done.stderr.count("\n") == 1
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(SwarmError, match="CUDA device") as e:
        resolve_device(f"cuda:{count}")
    assert "\n" not in str(e.value)
    if count:
        assert resolve_device("cuda") == "cuda:0" == resolve_device("auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_on_cuda_half_stages_train_and_the_gauge_counts_device_allocations(precision):
    torch.manual_seed(0)
    traced = trace_model("gpt2-tiny", "coarse", 4)
    workers = [s.worker for s in local_servers(traced, 3, lm_loss, device="cuda:0", precision=precision)]
    gauge = MemoryGauge(torch.device("cuda:0"))
    gauge.reset()
    data = torch.randint(0, 256, (8, 129), generator=torch.Generator().manual_seed(1))
    losses = [LocalPipeline(workers, "gpipe").train_step(data[:, :-1], data[:, 1:], 2) for _ in range(3)]
    assert losses[-1] < losses[0] and gauge.peak() >= gauge.used() > 0
    assert all(p.dtype == torch.float32 and p.is_cuda for w in workers for p in w.params)
