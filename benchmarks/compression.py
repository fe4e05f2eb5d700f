"""The codecs' cost in accuracy, as validation loss on real held-out text.

gpt2-tiny trained on Shakespeare's training plays (``training.data: shakespeare``, docs/data.md) for the
same number of steps, for every seed (model initialisation and data order both taken from it):

- ``single``: one process, the plain model, the same micro-batching, Adam, learning rate and warm-up
  (the reference of tests/test_training.py);
- ``off``: a 3-stage pipeline (the stage servers' real path: frames, AdaTopK, masks, in one process),
  uncompressed: it must equal ``single`` to float noise (the table says by how much it does not);
- ``4x``, ``10x``, ``16x``, ``32x``: the same pipeline at fixed wire ratios (activations and their
  gradients), from the first step;
- ``10x-plain``: the same ratio selecting by plain per-token magnitude (no channel scale);
- ``10x-ef``, ``32x-ef``: with error feedback (what compression dropped from one micro-batch's
  activations added to the next one's before selection: the experiment behind docs/adatopk.md's
  "error feedback is not applied");
- ``bf16``: uncompressed, float32 activations and gradients rounded to bfloat16 on the wire
  (``compression.wire_dtype: bfloat16``): the baseline of the codec rows;
- ``bf16-compute``: the stages compute under bfloat16 autocast too (``precision: bf16``, float32
  master weights and optimizer state), a bfloat16 wire;
- ``<codec>-<N>x`` (codec ``atk1``: today's AdaTopK packets, int8 values and varint indices; ``q8``,
  ``q4``, ``q2``: ATK2 packets of 8-, 4- or 2-bit values with Rice-coded indices): the wire ratio
  ``N`` over activations *and* gradients together (the forward ratio that gives it is calibrated on a
  tensor of the cut's shape; the table reports the ratio measured in training).

After training (and at a few steps on the way) the model is measured on a fixed set of validation
sequences from the held-out plays, forward through the pipeline as the swarm measures it (``evaluate``:
on a compressed pipeline the validation activations are compressed too; ``uncompressed`` evaluates the
same parameters with every link raw). Evaluating leaves nothing behind: the links' channel scales (and
error-feedback residuals) are put back as they were. Prints mean +- standard deviation over the seeds
(and min..max), the paired difference from ``single`` in percent, and the achieved wire ratio; writes
JSON with every seed's values.

    python -m benchmarks.compression [--steps 150] [--seeds 0,1,2] [--rows single,off,4x,10x,16x]
        [--model gpt2-tiny] [--jobs 2] [--device cpu|cuda] [--threads 1]
        [--json-out benchmarks/results/compression.json]

``rows`` of the JSON also carry, for the codec rows, ``codec``, ``wire_ratio`` (measured, forward and
backward bytes together), ``val_loss_mean``, ``val_loss_std``, ``seeds``, ``baseline_val_loss_mean``
(the ``bf16`` row's, else the single process's) and ``model``.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import copy
import functools
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm import config
from swarm.compression.adatopk import ChannelScale, Packet, decode, encode, encode_like
from swarm.compression.policy import LinkPolicy
from swarm.dag.trace import trace
from swarm.data import ByteCorpus, bits_per_byte, generated_corpus, lm_loss, training_data, validation_data
from swarm.models import load_model, resolve, trace_model
from swarm.pipeline import train_step
from swarm.pipeline.driver import evaluate
from swarm.runtime import lr_at, make_optimizer
from swarm.runtime.local import local_servers
from swarm.runtime.worker import LrSchedule

MODEL, DATA, STAGES = "gpt2-tiny", "shakespeare", 3
MICRO_BATCHES, MICRO_BATCH_SIZE = 4, 4          # 16 sequences of 128 bytes per step
LR, LR_WARMUP = 1e-3, 20                        # training.lr and training.lr_warmup_steps defaults
VALIDATION_BATCHES = 16                         # of MICRO_BATCH_SIZE: 64 held-out sequences


class ErrorFeedback(ChannelScale):
    """Selection on ``x + residual``, the residual being what the previous tensor of that name lost."""

    def __init__(self):
        super().__init__()
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, name: str, x: torch.Tensor, ratio: float) -> Packet:
        r = self.residual.get(name)
        x = x + r if r is not None and r.shape == x.shape else x
        packet = super().encode(name, x, ratio)
        self.residual[name] = x - decode(packet.data, device=x.device)[0].to(x.dtype)
        return packet


@dataclass(frozen=True)
class Variant:
    name: str
    ratio: float = 1.0           # the forward ratio (``codec`` rows: the wire ratio of both directions)
    selection: str = "channel"   # channel (per token, on the channel scale) | plain (per token, |x|) | feedback
    pipeline: bool = True
    codec: str | None = None     # atk1 | q8 | q4 | q2: ``ratio`` counts forward and backward bytes
    half: bool = False           # uncompressed tensors go as bfloat16
    precision: str = "fp32"      # what the stages compute in (``bf16``: autocast, and a bfloat16 wire)

    @property
    def label(self) -> str:
        if not self.pipeline:
            return "single process"
        if self.precision == "bf16":
            return "bf16 compute + wire"
        if self.half:
            return "3 stages, bf16 wire"
        if self.codec is not None:
            return f"{self.codec}, both ways"
        if self.ratio == 1:
            return "3 stages, off"
        return {"channel": "per token / channel", "plain": "per token, plain |x|",
                "feedback": "+ error feedback"}[self.selection]

    @property
    def bits(self) -> int | None:
        return CODEC_BITS.get(self.codec)


_CONFIG_CODEC = {("atk1" if c == "adatopk" else c): c for c in config.CODEC_BITS}   # row name -> compression.codec
CODEC_BITS = {name: config.CODEC_BITS[c] for name, c in _CONFIG_CODEC.items()}
WIRE_RATIOS = (4, 8, 16, 32, 48, 64, 100)
VARIANTS = {v.name: v for v in [
    Variant("single", pipeline=False), Variant("off"), Variant("bf16", half=True),
    Variant("bf16-compute", half=True, precision="bf16"), Variant("4x", 4), Variant("10x", 10),
    Variant("16x", 16), Variant("32x", 32), Variant("10x-plain", 10, "plain"), Variant("10x-ef", 10, "feedback"),
    Variant("32x-ef", 32, "feedback"),
    *(Variant(f"{codec}-{n}x", n, codec=codec) for codec in CODEC_BITS for n in WIRE_RATIOS)]}
DEFAULT_ROWS = "single,off,4x,10x,16x"


@functools.cache
def forward_ratio(wire_ratio: float, bits: int | None, shape: tuple[int, ...]) -> float:
    """The forward ratio whose packets, forward and backward on its mask, take ``1 / wire_ratio`` of
    the raw bytes of both directions (calibrated on a random tensor of the cut's ``shape``)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    raw = 2 * x.numel() * x.element_size()

    def both(r: float) -> float:
        packet = encode(x, r, bits=bits)
        return raw / (len(packet.data) + len(encode_like(x, packet.indices, bits)))
    lo, hi = 1.0, 4.0 * wire_ratio
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if both(mid) < wire_ratio else (lo, mid)
    return hi


# ---- what every run shares (benchmarks/churn_accuracy.py uses these too) ----

def text(seed: int) -> ByteCorpus:
    """The training plays, batches drawn with ``seed`` (``ByteCorpus.batch``'s stream)."""
    corpus = _training_text()
    seeded = copy.copy(corpus)
    seeded.seed = seed
    return seeded


_CORPUS: list[ByteCorpus] = []


def _training_text() -> ByteCorpus:
    if not _CORPUS:
        corpus, loss = training_data(DATA, [MICRO_BATCH_SIZE, 128], "int64", [MICRO_BATCH_SIZE, 128, 256])
        assert loss is lm_loss
        _CORPUS.append(corpus)
    return _CORPUS[0]


def validation() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation batches: windows evenly spread over the held-out plays."""
    return validation_data(DATA, [MICRO_BATCH_SIZE, 128], "int64", [MICRO_BATCH_SIZE, 128, 256],
                           batches=VALIDATION_BATCHES, batch_size=MICRO_BATCH_SIZE)


def plain_model(seed: int) -> torch.nn.Module:
    """``MODEL`` with the initial weights of ``seed`` (what ``pipeline(seed, ...)`` starts from)."""
    torch.manual_seed(seed)
    return load_model(MODEL).module


def pipeline(seed: int, variant: Variant, device: str = "cpu") -> tuple:
    """(traced model, stage servers) of a 3-stage pipeline of ``MODEL`` initialised from ``seed``, with
    the learning-rate warm-up a node uses and ``variant``'s compression on every link."""
    torch.manual_seed(seed)
    built = load_model(MODEL)
    traced = trace(built.module, built.example_inputs(MICRO_BATCH_SIZE), "coarse", built.sequential_modules, built.name)
    mode = "fixed" if variant.ratio > 1 else "off"
    ratio = variant.ratio
    if variant.codec == "atk1":   # ATK2 sizes its packets for both directions itself
        ratio = forward_ratio(variant.ratio, variant.bits, (MICRO_BATCH_SIZE, 128, _width()))
    servers = local_servers(traced, STAGES, lm_loss, lambda: LinkPolicy(mode, 1.0, 1.0, 1, 1e9, fixed_ratio=ratio,
                                                                        codec=_CONFIG_CODEC.get(variant.codec, "adatopk"),
                                                                        half=variant.half),
                            lr=LR, device=device, precision=variant.precision)
    for s in servers:
        s.worker.lr_schedule = LrSchedule(LR, LR_WARMUP)
        s.link.channel_scale = ErrorFeedback() if variant.selection == "feedback" else \
            None if variant.selection == "plain" else s.link.channel_scale
    return traced, servers


def _width() -> int:
    """The model's feature width (the last dim of what crosses a cut)."""
    return int(resolve(MODEL).d_model)


async def measure(servers: list, batches, uncompressed: bool = False) -> float:
    """Validation loss through the pipeline; the links' state (channel scales, residuals) left as it was."""
    kept = [(s.link.policy, copy.deepcopy(s.link.channel_scale)) for s in servers]
    try:
        if uncompressed:
            for s in servers:
                s.link.policy = None
        return (await evaluate(servers[0], batches)).loss
    finally:
        for s, (policy, scale) in zip(servers, kept):
            s.link.policy, s.link.channel_scale = policy, scale


def measure_model(model: torch.nn.Module, batches) -> float:
    """Validation loss of a plain model (mean over samples, as ``evaluate`` weighs it)."""
    model.eval()
    try:
        with torch.no_grad():
            losses = [(float(lm_loss(model(x), y)), len(x)) for x, y in batches]
    finally:
        model.train()
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def parameters(servers: list) -> dict[str, torch.Tensor]:
    return {name: t for s in servers for name, t in s.worker.state().items()}


def checkpoints(steps: int, every: int) -> set[int]:
    """The step counts after which the model is measured: every ``every`` and the last."""
    return {n for n in range(every, steps, every)} | {steps} if every else {steps}


def train_pipeline(servers: list, corpus: ByteCorpus, steps: int, batches, at: set[int],
                   hook: Callable[[int, list], None] | None = None) -> dict:
    """``steps`` optimizer steps; ``hook(done, servers)`` after each (``done`` steps applied, between
    two steps); validation loss after the step counts in ``at``."""
    async def run() -> tuple[list[float], list[tuple[int, float]]]:
        losses, curve = [], []
        for step in range(steps):
            x, y = corpus.batch(step, MICRO_BATCHES * MICRO_BATCH_SIZE)
            losses.append(await train_step(servers[0], x, y, MICRO_BATCHES, 3))
            if hook is not None:
                hook(step + 1, servers)
            if step + 1 in at:
                curve.append((step + 1, await measure(servers, batches)))
        return losses, curve

    losses, curve = asyncio.run(run())
    out = {"train_loss_last5": sum(losses[-5:]) / len(losses[-5:]), "curve": curve, "val_loss": curve[-1][1]}
    raw, wire = sum(s.counters.act_raw for s in servers), sum(s.counters.act_wire for s in servers)
    out["achieved_ratio"] = raw / wire if wire else 1.0
    return out


def train_single(seed: int, corpus: ByteCorpus, steps: int, batches, at: set[int], device: str = "cpu") -> tuple[dict, dict]:
    """The single-process reference: (result, final parameters)."""
    model = plain_model(seed).to(device)
    opt = make_optimizer("adam", model.parameters(), LR)
    losses, curve = [], []
    for step in range(steps):
        x, y = corpus.batch(step, MICRO_BATCHES * MICRO_BATCH_SIZE)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for xm, ym in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES)):
            loss = lm_loss(model(xm.to(device)), ym.to(device))
            (loss / MICRO_BATCHES).backward()
            total += float(loss.detach())
        opt.param_groups[0]["lr"] = lr_at(step, LR, LR_WARMUP)
        opt.step()
        losses.append(total / MICRO_BATCHES)
        if step + 1 in at:
            curve.append((step + 1, measure_model(model, [(x.to(device), y.to(device)) for x, y in batches])))
    out = {"train_loss_last5": sum(losses[-5:]) / len(losses[-5:]), "curve": curve, "val_loss": curve[-1][1],
           "achieved_ratio": 1.0}
    return out, {k: v.detach().cpu().clone() for k, v in model.named_parameters()}


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min, max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def pm(s: dict, digits: int = 3, sign: str = "") -> str:
    return f"{s['mean']:{sign}.{digits}f} ± {s['std']:.{digits}f}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(ratio: float, steps: int, channel_scale: bool = True, micro_batches: int = 4, size: int = 4,
          device: str = "cpu", error_feedback: bool = False) -> dict:
    """The earlier measurement, kept for tests/test_compressed_training.py's guard: *training* loss on the
    generated corpus, seed 0, no learning-rate warm-up; final loss = mean of the last 5 steps."""
    traced = trace_model(MODEL, "coarse", size)
    mode = "fixed" if ratio > 1 else "off"
    servers = local_servers(traced, STAGES, lm_loss, lambda: LinkPolicy(mode, 1.0, 1.0, 1, 1e9, fixed_ratio=ratio),
                            device=device)
    for s in servers:
        s.link.channel_scale = ErrorFeedback() if error_feedback else s.link.channel_scale if channel_scale else None
    corpus = ByteCorpus(generated_corpus(), 128)

    async def run() -> list[float]:
        return [await train_step(servers[0], *corpus.batch(step, micro_batches * size), micro_batches, 3)
                for step in range(steps)]

    losses = asyncio.run(run())
    raw, wire = sum(s.counters.act_raw for s in servers), sum(s.counters.act_wire for s in servers)
    return {"device": device, "target_ratio": ratio, "channel_scale": channel_scale, "error_feedback": error_feedback,
            "achieved_ratio": raw / wire, "final_loss": sum(losses[-5:]) / 5, "losses": losses}


# ---- the benchmark ----

class _InProcess:
    """``pool.map`` without a pool (``--jobs 1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, *iterables):
        return map(fn, *iterables)


def set_model(name: str) -> None:
    global MODEL
    MODEL = name


def _job(item: tuple[Variant, int], reference: dict | None, steps: int, at: set[int], batches, device: str,
         threads: int) -> tuple[dict, dict | None]:
    """One run, in a worker process or here: (result, the single process's final parameters or None)."""
    if threads:
        torch.set_num_threads(threads)
    variant, seed = item
    refs = {} if reference is None else {seed: reference}
    out = run_variant(variant, seed, steps, at, batches, device, refs)
    return out, refs.get(seed) if not variant.pipeline else None


def run_variant(variant: Variant, seed: int, steps: int, at: set[int], batches, device: str,
                reference: dict[int, dict]) -> dict:
    started = time.perf_counter()
    corpus = text(seed)
    if not variant.pipeline:
        out, params = train_single(seed, corpus, steps, batches, at, device)
        reference[seed] = params
        out["val_loss_uncompressed"] = out["val_loss"]
    else:
        _, servers = pipeline(seed, variant, device)
        out = train_pipeline(servers, corpus, steps, batches, at)
        out["val_loss_uncompressed"] = asyncio.run(measure(servers, batches, uncompressed=True))
        if variant.ratio == 1 and seed in reference:
            ours, theirs = parameters(servers), reference[seed]
            out["max_param_diff_vs_single"] = max(float((ours[k] - v).abs().max()) for k, v in theirs.items())
    out.update(seed=seed, bits_per_byte=bits_per_byte(out["val_loss"]), seconds=time.perf_counter() - started)
    log(f"  {variant.name:>10} seed {seed}: val {out['val_loss']:.4f} (uncompressed {out['val_loss_uncompressed']:.4f}), "
        f"train {out['train_loss_last5']:.4f}, x{out['achieved_ratio']:.2f}, {out['seconds']:.0f} s")
    return out


def summarise(variant: Variant, runs: list[dict], base: dict[int, float] | None,
              baseline: dict[int, float] | None = None) -> dict:
    """One row: spreads over the seeds; ``base``: the single process's val loss by seed (the paired
    difference); ``baseline``: the bf16 row's (``baseline_val_loss_mean``, and the paired difference)."""
    val = [r["val_loss"] for r in runs]
    row = {"variant": variant.name, "label": variant.label, "target_ratio": variant.ratio, "selection": variant.selection,
           "pipeline": variant.pipeline, "precision": variant.precision,
           "codec": variant.codec or ("bf16" if variant.half else
                                                                   "atk1" if variant.ratio > 1 else "off"),
           "model": MODEL, "seeds": [r["seed"] for r in runs],
           "wire_ratio": statistics.fmean(r["achieved_ratio"] for r in runs),
           "val_loss_mean": statistics.fmean(val), "val_loss_std": statistics.stdev(val) if len(val) > 1 else 0.0,
           "per_seed": runs,
           "val_loss": spread([r["val_loss"] for r in runs]),
           "val_loss_uncompressed": spread([r["val_loss_uncompressed"] for r in runs]),
           "bits_per_byte": spread([r["bits_per_byte"] for r in runs]),
           "train_loss_last5": spread([r["train_loss_last5"] for r in runs]),
           "achieved_ratio": statistics.fmean(r["achieved_ratio"] for r in runs)}
    if base is not None and all(r["seed"] in base for r in runs):
        row["delta_pct_vs_single"] = spread([(r["val_loss"] / base[r["seed"]] - 1) * 100 for r in runs])
        row["delta_vs_single"] = spread([r["val_loss"] - base[r["seed"]] for r in runs])
    reference = baseline if baseline and all(r["seed"] in baseline for r in runs) else base
    if reference is not None and all(r["seed"] in reference for r in runs):
        row["baseline"] = "bf16" if reference is baseline else "single"
        row["baseline_val_loss_mean"] = statistics.fmean(reference[r["seed"]] for r in runs)
        row["delta_pct_vs_baseline"] = spread([(r["val_loss"] / reference[r["seed"]] - 1) * 100 for r in runs])
    diffs = [r["max_param_diff_vs_single"] for r in runs if "max_param_diff_vs_single" in r]
    if diffs:
        row["max_param_diff_vs_single"] = max(diffs)
    return row


def table(rows: list[dict], steps: int, seeds: list[int], device: str) -> str:
    lines = [f"{MODEL} on {DATA}, {device}, {steps} steps of {MICRO_BATCHES} x {MICRO_BATCH_SIZE} sequences of 128 bytes, "
             f"Adam lr {LR:g} (warm-up {LR_WARMUP}), seeds {','.join(map(str, seeds))}; validation loss on "
             f"{VALIDATION_BATCHES * MICRO_BATCH_SIZE} held-out sequences after the last step (mean ± std over seeds)",
             f"{'row':>10} {'selection':>21} {'wire x':>7} {'val loss':>15} {'min..max':>13} {'bits/byte':>15} "
             f"{'vs baseline':>16} {'uncompressed':>15} {'train (last 5)':>15}"]
    for r in rows:
        v, d = r["val_loss"], r.get("delta_pct_vs_single")
        d = r.get("delta_pct_vs_baseline", d)
        vs = "-" if d is None or not r["pipeline"] or r["variant"] == "bf16" else f"{d['mean']:+.2f} ± {d['std']:.2f}%"
        lines.append(f"{r['variant']:>10} {r['label']:>21} {r['achieved_ratio']:>7.2f} {pm(v, 4):>15} "
                     f"{v['min']:.3f}..{v['max']:.3f} {pm(r['bits_per_byte']):>15} {vs:>16} "
                     f"{pm(r['val_loss_uncompressed'], 4):>15} {pm(r['train_loss_last5']):>15}")
    off = next((r for r in rows if r["variant"] == "off" and "delta_vs_single" in r), None)
    if off is not None:
        d = off["delta_vs_single"]
        lines.append(f"3 stages off vs single process: validation loss differs by {d['mean']:+.2e} "
                     f"(largest |diff| {max(abs(d['min']), abs(d['max'])):.2e}); largest parameter difference "
                     f"{off.get('max_param_diff_vs_single', math.nan):.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated: model initialisation and data order")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--eval-every", type=int, default=50, help="also measure after every this many steps (0: only at the end)")
    parser.add_argument("--json-out", default="benchmarks/results/compression.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default=MODEL, help="a gpt preset with a byte vocabulary and 128-token windows")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--table-out", help="also write the codec rows as the link policy's table "
                        "(swarm/compression/codecs.json)")
    parser.add_argument("--plot", help="also plot each codec's gap to the bf16 wire against the wire ratio (PNG)")
    parser.add_argument("--table-from", help="instead of running: --table-out / --plot from these results JSONs "
                        "(comma-separated, each with its bf16 baseline; the table from those of --model)")
    args = parser.parse_args(argv)
    if args.table_from:
        if not (args.table_out or args.plot):
            parser.error("--table-from needs --table-out or --plot")
        results = [json.loads(Path(p).read_text()) for p in args.table_from.split(",")]
        if args.table_out:
            write_table([r for r in results if r["model"] == args.model], Path(args.table_out), args.table_from)
        if args.plot:
            plot(results, Path(args.plot))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    set_model(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [r for r in args.rows.split(",") if r not in VARIANTS]
    if unknown or args.steps < 1:
        parser.error(f"unknown rows {unknown} (known: {', '.join(VARIANTS)})" if unknown else "--steps must be >= 1")
    variants = [VARIANTS[r] for r in args.rows.split(",")]
    variants.sort(key=lambda v: v.pipeline)   # the single-process reference first: every row is compared with it
    started, batches, at = time.perf_counter(), validation(), checkpoints(args.steps, args.eval_every)
    reference: dict[int, dict] = {}
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    job = functools.partial(_job, steps=args.steps, at=at, batches=batches, device=args.device, threads=args.threads)
    with concurrent.futures.ProcessPoolExecutor(args.jobs, multiprocessing.get_context("fork")) if args.jobs > 1 else \
            _InProcess() as pool:
        for phase in (False, True):   # the single-process references first: the pipeline's "off" rows check against them
            todo = [(v, seed) for seed in seeds for v in variants if v.pipeline == phase]
            for (v, seed), (out, params) in zip(todo, pool.map(job, todo, [reference.get(s) for _, s in todo])):
                runs[v.name].append(out)
                if params is not None:
                    reference[seed] = params
    for v in variants:
        runs[v.name].sort(key=lambda r: seeds.index(r["seed"]))
    single = {r["seed"]: r["val_loss"] for r in runs.get("single", [])} or None
    bf16 = {r["seed"]: r["val_loss"] for r in runs.get("bf16", [])} or None
    rows = [summarise(v, runs[v.name], single, bf16) for v in variants]
    seconds = time.perf_counter() - started
    print(table(rows, args.steps, seeds, args.device))
    print(f"({seconds / 60:.1f} min)")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({
        "model": MODEL, "data": DATA, "device": args.device, "threads": args.threads, "jobs": args.jobs,
        "steps": args.steps, "seeds": seeds,
        "stages": STAGES, "micro_batches": MICRO_BATCHES, "micro_batch_size": MICRO_BATCH_SIZE, "lr": LR,
        "lr_warmup_steps": LR_WARMUP, "compression_warmup_steps": 0,
        "validation_sequences": VALIDATION_BATCHES * MICRO_BATCH_SIZE, "metric": "validation loss (nats/byte)",
        "command": "python -m benchmarks.compression " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": seconds, "rows": rows}, indent=1))
    if args.table_out:
        write_table([json.loads(Path(args.json_out).read_text())], Path(args.table_out), args.json_out)
    if args.plot:
        plot([json.loads(Path(args.json_out).read_text())], Path(args.plot))
    return 0


def plot(results: list[dict], path: Path) -> None:
    """Validation-loss gap to the bf16 wire (mean ± std over seeds) against the measured wire ratio,
    a line per codec and model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in results:
        for row in r["rows"]:
            gap = row.get("delta_pct_vs_baseline")
            if row.get("codec") in CODEC_BITS and gap is not None and row.get("baseline") == "bf16":
                lines.setdefault((row["codec"], r["model"]), []).append((row["wire_ratio"], gap["mean"], gap["std"]))
    for (codec, model), points in sorted(lines.items()):
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=f"{codec} ({model})", linestyle="-" if model == "gpt2-tiny" else "--")
    ax.axhline(3.0, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("wire ratio (activations and gradients, measured)")
    ax.set_ylabel("val loss vs bf16 wire (%)")
    ax.set_title("Compression on a 3-stage pipeline: validation loss at equal steps, 3 seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def write_table(results: list[dict], path: Path, source: str) -> None:
    """The codec rows of ``results`` (runs of one model) as ``swarm.compression.measured``'s table:
    per codec (by its ``compression.codec`` name), the ratio its policy asks for, the measured wire
    ratio and the gap against the bf16 wire in percent (mean and std over the seeds)."""
    first = results[0]
    if any((r["model"], r["steps"], r["seeds"]) != (first["model"], first["steps"], first["seeds"]) for r in results):
        raise SystemExit("--table-from: the results are of different models, steps or seeds")
    set_model(first["model"])
    codecs: dict[str, dict[float, dict]] = {}
    for row in (row for r in results for row in r["rows"]):
        name, gap = row.get("codec"), row.get("delta_pct_vs_baseline")
        if name not in CODEC_BITS or gap is None or row.get("baseline") != "bf16":
            continue
        ratio = row["target_ratio"] if name != "atk1" else \
            forward_ratio(row["target_ratio"], None, (first["micro_batch_size"], 128, _width()))
        codecs.setdefault(_CONFIG_CODEC[name], {}).setdefault(round(ratio, 3), {
            "ratio": round(ratio, 3), "wire_ratio": round(row["wire_ratio"], 3),
            "gap_pct": round(gap["mean"], 3), "std_pct": round(gap["std"], 3)})
    codecs = {c: [rows[r] for r in sorted(rows)] for c, rows in codecs.items()}
    path.write_text(json.dumps({
        "source": f"python -m benchmarks.compression ({source}: {first['model']} on {first['data']}, "
                  f"{first['steps']} steps, seeds {first['seeds']})",
        "metric": "validation loss vs the uncompressed bfloat16 wire, percent", "codecs": codecs}, indent=1) + "\n")
    log(f"wrote {path}: {', '.join(f'{c} ({len(r)} rows)' for c, r in codecs.items())}")


if __name__ == "__main__":
    raise SystemExit(main())
