"""Hugging Face causal LMs (``kind: hf``, issue 21 part 1): tiny GPT-2 and Llama (RoPE, grouped-query
attention) built from configs, cut at decoder layers into 3 stages, give the whole transformers
model's logits and every parameter's gradient; the demo trains one through 3 stages (validation loss
falls) and its export loads back with ``from_pretrained``, same logits; bad directories are one line."""
import json

import pytest
import torch

from swarm.dag.graph import Partition
from swarm.dag.stages import extract_stages
from swarm.data import lm_loss
from swarm.errors import SwarmError
from swarm.models import load_model, trace_model
from swarm.models.hf import HFCausalLM, load_hf
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                              max_position_embeddings=64, bos_token_id=0, eos_token_id=0),
}


def hf_dir(tmp_path, arch: str):
    path = tmp_path / arch
    CONFIGS[arch]().save_pretrained(str(path))
    (tmp_path / f"{arch}.yaml").write_text(f"kind: hf\npath: {arch}\nseq_len: 32\n")
    return path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_three_stage_split_equals_the_whole_transformers_model(tmp_path, arch):
    hf_dir(tmp_path, arch)
    built = load_model(str(tmp_path / f"{arch}.yaml"))   # seeded: the same weights trace_model builds
    reference = built.module.hf_model()                  # a plain transformers model holding them
    traced = trace_model(str(tmp_path / f"{arch}.yaml"), "coarse", 2)
    assert [op.name for op in traced.dag.ops][1:-1] == [f"blocks_{i}" for i in range(5)]   # embed, 3 layers, head
    stages = extract_stages(traced, Partition((0, 3, 5), len(traced.dag.ops)))
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    h = (x,)
    for stage in stages:
        h = stage(*h)
    logits = h[0]
    lm_loss(logits, y).backward()
    ref_logits = reference(x).logits
    lm_loss(ref_logits, y).backward()
    assert (logits - ref_logits).abs().max() <= 1e-5
    ref_grads = dict(HFCausalLM(reference, 32).named_parameters())
    grads = {n: p.grad for n, p in traced.gm.named_parameters()}
    assert len(grads) == len(ref_grads) == len(list(reference.parameters()))
    for name, p in ref_grads.items():
        assert (grads[name] - p.grad).abs().max() <= 1e-5, name


def test_the_demo_trains_a_hf_llama_through_three_stages_and_exports_it_for_from_pretrained(tmp_path):
    hf_dir(tmp_path, "llama")
    out = tmp_path / "demo"
    result = run_cli("demo", "--model", str(tmp_path / "llama.yaml"), "--nodes", "3", "--stages", "3", "--steps", "12",
                     "--micro-batches", "2", "--micro-batch-size", "4", "--out-dir", str(out),
                     "--json-out", str(tmp_path / "m.json"), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["stages"] == 3 and metrics["val_loss_last"] < metrics["val_loss_first"]
    exported = metrics["model_file"]
    model = __import__("swarm").load_exported(exported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported + ".hf", local_files_only=True).eval()
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-5


def test_bad_hf_directories_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    bert = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    bert.save_pretrained(str(tmp_path / "bert"))
    hf_dir(tmp_path, "gpt2")
    cases = {"empty": ("path: empty", "holds no config.json"),
             "bert": ("path: bert", "architecture 'bert' is not supported"),
             "noweights": ("path: gpt2\nweights: required", "holds no weights")}
    for name, (body, message) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(f"kind: hf\n{body}\n")
        done = run_cli("dag", "--model", str(tmp_path / f"{name}.yaml"), timeout=120)
        assert done.returncode == 2 and message in done.stderr, (name, done.stderr)
        assert done.stderr.strip().count("\n") == 0, done.stderr
    with pytest.raises(SwarmError, match="holds no weights"):
        load_hf(tmp_path / "gpt2", weights="required")
