"""Export (docs/export.md): a pipeline's stages, checkpointed or saved, become ONE safetensors file whose model
computes exactly what the stages compute; generate and eval read it; bad input is one line and exit 2."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import swarm
from swarm.dag.stages import extract_stages, run_stages
from swarm.dag.trace import trace
from swarm.data import ByteCorpus, SyntheticImages, generated_corpus, lm_loss, validation_data
from swarm.errors import SwarmError
from swarm.export import META_MODEL, META_STEP, encode_prompt, export, generate, sample, write_spec
from swarm.models import GPT, build, load_model, resolve
from swarm.runtime import LocalPipeline, StageWorker
from swarm.runtime.state import capture, op_tensors, write_checkpoint
from tests.conftest import run_cli

STEPS = 3


class Trained:
    """A model trained a few steps by a LocalPipeline of its stages."""

    def __init__(self, name: str, n_stages: int, loss_fn, data, batch: int = 4):
        torch.manual_seed(0)
        built = load_model(name)
        self.name, self.data = name, data
        self.traced = trace(built.module, built.example_inputs(2), "coarse", name=built.name)
        self.stages = extract_stages(self.traced, self.traced.dag.balanced_partition(n_stages))
        self.workers = [StageWorker(s, "adam", 1e-3, loss_fn=loss_fn if i == n_stages - 1 else None)
                        for i, s in enumerate(self.stages)]
        pipeline = LocalPipeline(self.workers)
        for step in range(STEPS):
            pipeline.train_step(*data.batch(step, batch), micro_batches=2)

    def checkpoint(self, directory, stages=None, step: int = STEPS) -> None:
        """Each stage's op states, as a node's session writes them (optimizer state included)."""
        owned = op_tensors(self.traced.dag, self.traced.gm)
        for k, w in enumerate(self.workers):
            if stages is None or k in stages:
                ops = [op for op in w.stage.io.ops if op in owned]
                write_checkpoint(directory, capture(w.stage.module, w.optimizer, owned, ops, step), k, step)

    def save(self, directory, peer: str = "peer0000", step: int = STEPS) -> None:
        """``TrainingSession.save``'s layout: one file per stage and replica."""
        directory.mkdir(parents=True, exist_ok=True)
        for k, w in enumerate(self.workers):
            torch.save({"step": step, "stage": k, "state": w.state()}, directory / f"stage{k}-{peer}.pt")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.workers:
            w.stage.module.eval()   # BatchNorm: the running statistics, as the exported model uses them
        with torch.no_grad():
            return run_stages(self.stages, x)


@pytest.fixture(scope="module")
def gpt():
    return Trained("gpt2-tiny", 3, lm_loss, ByteCorpus(generated_corpus(), 128))


@pytest.fixture(scope="module")
def resnet():
    return Trained("resnet18", 2, F.cross_entropy, SyntheticImages(10, 32))


@pytest.fixture(scope="module")
def gpt_file(gpt, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt")
    gpt.checkpoint(directory / "ckpt")
    write_spec(directory / "ckpt", "gpt2-tiny")
    return export(directory / "ckpt", directory / "gpt.safetensors").path


@pytest.fixture(scope="module")
def ascii_file(tmp_path_factory):
    """A small GPT with a 128-byte vocabulary and tied embeddings, from a one-stage save directory."""
    directory = tmp_path_factory.mktemp("ascii")
    spec = directory / "ascii.yaml"
    spec.write_text("kind: gpt\nvocab_size: 128\nseq_len: 16\nn_layer: 1\nn_head: 2\nd_model: 32\ntie_weights: true\n")
    torch.manual_seed(1)
    module = build(resolve(str(spec))).module
    (directory / "save").mkdir()
    torch.save({"step": 7, "stage": 0, "state": module.state_dict()}, directory / "save" / "stage0-abcdefgh.pt")
    write_spec(directory / "save", str(spec))
    return export(directory / "save", directory / "ascii.safetensors").path, module


def one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def test_exported_gpt_computes_what_the_trained_pipeline_computes(gpt, gpt_file):
    x, _ = gpt.data.batch(100, 4)
    model = swarm.load_exported(gpt_file)
    assert not model.training and isinstance(model, GPT)
    with torch.no_grad():
        assert (model(x) - gpt.logits(x)).abs().max() <= 1e-5
    with safe_open(str(gpt_file), framework="pt") as f:   # the model's tensors, no optimizer state
        assert set(f.keys()) == set(load_model("gpt2-tiny").module.state_dict())
        assert f.metadata()[META_STEP] == str(STEPS)
        assert json.loads(f.metadata()[META_MODEL])["spec"]["d_model"] == 256


def test_exported_resnet_keeps_batchnorm_statistics(resnet, tmp_path):
    resnet.checkpoint(tmp_path / "ckpt")
    write_spec(tmp_path / "ckpt", "resnet18")
    done = export(tmp_path / "ckpt", tmp_path / "r.safetensors")
    model = swarm.load_exported(done.path)
    x, _ = resnet.data.batch(100, 4)
    with torch.no_grad():
        assert (model(x) - resnet.logits(x)).abs().max() <= 1e-5
    trained = {n: b for w in resnet.workers for n, b in w.stage.module.named_buffers()}
    assert trained["stem.1.num_batches_tracked"] == STEPS * 2   # two micro-batches a step
    assert all(torch.equal(b, trained[n]) for n, b in model.named_buffers())


def test_save_dir_export_picks_the_newest_replica_and_refuses_mixed_steps(gpt, tmp_path):
    gpt.save(tmp_path / "save")
    stale = {k: torch.zeros_like(t) for k, t in gpt.workers[1].state().items()}
    torch.save({"step": STEPS - 1, "stage": 1, "state": stale}, tmp_path / "save" / "stage1-oldpeer0.pt")
    done = export(tmp_path / "save", tmp_path / "s.safetensors", model="gpt2-tiny")   # no model.json: named here
    x, _ = gpt.data.batch(101, 2)
    with torch.no_grad():
        assert (swarm.load_exported(done.path)(x) - gpt.logits(x)).abs().max() <= 1e-5
    assert done.step == STEPS and "save-dir" in done.summary and "stage1-peer0000.pt" in done.summary
    torch.save({"step": STEPS - 1, "stage": 2, "state": gpt.workers[2].state()}, tmp_path / "save" / "stage2-peer0000.pt")
    with pytest.raises(SwarmError, match="different steps.*stage 2 at step 2"):
        export(tmp_path / "save", tmp_path / "s.safetensors", model="gpt2-tiny")


def test_a_newer_incomplete_checkpoint_step_is_passed_over(gpt, tmp_path):
    gpt.checkpoint(tmp_path / "ckpt")
    gpt.checkpoint(tmp_path / "ckpt", stages={0, 1}, step=STEPS + 1)   # the last stage never wrote step 4
    write_spec(tmp_path / "ckpt", "gpt2-tiny")
    assert export(tmp_path / "ckpt", tmp_path / "c.safetensors").step == STEPS


def test_bad_export_input_is_one_line_exit_2(gpt, tmp_path):
    gpt.checkpoint(tmp_path / "partial", stages={0, 1})
    write_spec(tmp_path / "partial", "gpt2-tiny")
    out = str(tmp_path / "x.safetensors")
    one_line_error(run_cli("export", "--checkpoint", str(tmp_path / "partial"), "--out", out), "lacks ops", "ln_f", "lm_head")
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("export", "--checkpoint", str(tmp_path / "empty"), "--out", out), "holds no checkpoint")
    gpt.checkpoint(tmp_path / "nospec")
    one_line_error(run_cli("export", "--checkpoint", str(tmp_path / "nospec"), "--out", out), "no model.json", "--model")
    (tmp_path / "wide.yaml").write_text("kind: gpt\nvocab_size: 256\nseq_len: 128\nn_layer: 4\nn_head: 4\nd_model: 128\n")
    one_line_error(run_cli("export", "--checkpoint", str(tmp_path / "nospec"), "--out", out, "--model", str(tmp_path / "wide.yaml")),
                   "blocks.0.ln_1.weight' has shape [256]", "expects [128]")
    assert not (tmp_path / "x.safetensors").exists()


def test_files_that_are_not_exports_are_refused(tmp_path, ascii_file):
    (tmp_path / "random.bin").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    torch.save(ascii_file[1].state_dict(), tmp_path / "plain.pt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for name, message in [("random.bin", "not a safetensors file"), ("plain.pt", "not a safetensors file"),
                          ("other.safetensors", "without swarm metadata"), ("missing.safetensors", "does not exist")]:
        with pytest.raises(SwarmError, match=message):
            swarm.load_exported(tmp_path / name)
    for name in ("random.bin", "plain.pt"):
        one_line_error(run_cli("generate", "--model", str(tmp_path / name), "--prompt", "hi"), "not a safetensors file")


def test_generate_prints_the_prompt_and_the_bytes_asked_for(ascii_file):
    path, module = ascii_file
    text = generate(path, "ab", tokens=40, seed=3)
    assert text.startswith("ab") and len(text) == 42 and text.isascii() and text == generate(path, "ab", tokens=40, seed=3)
    loaded = swarm.load_exported(path)
    assert loaded.lm_head.weight is loaded.wte.weight   # tied embeddings stay tied (stored once)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), module.eval()(x))
    result = run_cli("generate", "--model", str(path), "--prompt", "ab", "--tokens", "40", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == text.replace("\r\n", "\n").replace("\r", "\n") + "\n"   # run_cli reads universal newlines
    one_line_error(run_cli("generate", "--model", str(path), "--prompt", "café"), "'é'", "128-byte vocabulary")
    one_line_error(run_cli("generate", "--model", str(path), "--prompt", ""), "prompt is empty")


def test_generate_from_an_exported_gpt2_tiny(gpt_file, resnet, tmp_path):
    model = swarm.load_exported(gpt_file)
    new = sample(model, encode_prompt("the node ", 256), 130, 128, 256, seed=0)   # past seq_len: the context is cropped
    assert len(new) == 130 and all(0 <= b < 256 for b in new)
    assert sample(model, list(b"the"), 5, 128, 256, temperature=0) == sample(model, list(b"the"), 5, 128, 256, temperature=0)
    result = run_cli("generate", "--model", str(gpt_file), "--prompt", "the swarm", "--tokens", "24", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the swarm") and 9 < len(result.stdout.rstrip("\n")) <= 9 + 24
    resnet.save(tmp_path / "save")
    done = export(tmp_path / "save", tmp_path / "r.safetensors", model="resnet18")
    one_line_error(run_cli("generate", "--model", str(done.path), "--prompt", "hi"), "not a language model")


def test_eval_reports_the_validation_loss(gpt, gpt_file, tmp_path):
    result = run_cli("eval", "--model", str(gpt_file), "--data", "generated", "--batches", "2", "--batch-size", "4", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    batches = validation_data("generated", [1, 128], "int64", [1, 128, 256], 2, 4)
    want = sum(float(lm_loss(gpt.logits(x), y)) for x, y in batches) / len(batches)
    assert abs(got["loss"] - want) < 1e-5 and got["step"] == STEPS
    assert math.isclose(got["bits_per_byte"], got["loss"] / math.log(2)) and math.isclose(got["perplexity"], math.exp(got["loss"]))
    text = run_cli("eval", "--model", str(gpt_file), "--data", "generated", "--batches", "1")
    assert text.returncode == 0 and "bits/byte" in text.stdout and "perplexity" in text.stdout
    one_line_error(run_cli("eval", "--model", str(gpt_file), "--data", str(tmp_path / "none" / "*.txt")), "eval data", "matches no")


def test_eval_of_a_classifier_reports_accuracy(resnet, tmp_path):
    resnet.save(tmp_path / "save")
    write_spec(tmp_path / "save", "resnet18")
    done = export(tmp_path / "save", tmp_path / "r.safetensors")
    result = run_cli("eval", "--model", str(done.path), "--data", "synthetic-images", "--batches", "2", "--batch-size", "4", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert 0 <= got["accuracy"] <= 1 and math.isfinite(got["loss"]) and "perplexity" not in got
