"""``python node.py <command>``: the node's command line. Commands stay thin; the work lives in the package."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

from swarm.config import DEVICE_PATTERN, NetworkConfig, NodeConfig, config_dir, load, validate
from swarm.errors import SwarmError
from swarm.export import add_commands

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (plus exit code 2), like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _at_least(low: float, kind: type = int):
    """argparse type: a number of ``kind`` that is at least ``low`` (bad values give the usual one-line error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a{'n integer' if kind is int else ' number'}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text} is below the minimum {low:g}")
        return value
    return parse


def _device(text: str) -> str:
    """argparse type: a ``device`` setting (auto, cpu, cuda, cuda:N, mps)."""
    if not re.match(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device (choose auto, cpu, cuda, cuda:N or mps)")
    return text


def _shape(text: str) -> list[int]:
    """argparse type: a per-sample shape such as ``8`` or ``3,32,32``."""
    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape (positive integers joined by commas, e.g. 3,32,32)")
    return shape


def _input_shape_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", type=_shape, metavar="D[,D...]", help="per-sample float32 input shape of a "
                   "package.module:factory model without example_inputs")


def _human(n: float, unit: str = "") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{prefix}{unit}" if prefix else f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def _node_config(args: argparse.Namespace) -> NodeConfig:
    cfg = load(NodeConfig, args.config) if args.config else NodeConfig()
    overrides = {k: getattr(args, k) for k in ("model", "granularity", "device", "input_shape") if getattr(args, k, None)}
    return cfg.model_copy(update={**overrides, **({"memory_limit_gb": args.max_memory} if getattr(args, "max_memory", None) else {})})


def _trace(cfg: NodeConfig, batch_size: int):
    from swarm.models import trace_model

    return trace_model(cfg.model, cfg.granularity, batch_size, data=cfg.training.data, input_shape=cfg.input_shape)


def cmd_dag(args: argparse.Namespace) -> int:
    cfg = _node_config(args)
    dag = _trace(cfg, args.batch_size).dag
    cuts = dag.cut_bytes()
    largest = max(range(len(cuts)), key=cuts.__getitem__)
    if args.json:
        out = dag.to_dict()
        out["largest_cut"] = {"after": dag.ops[largest].name, "bytes": cuts[largest]}
        print(json.dumps(out))
        return 0
    print(f"{'#':>4}  {'op':<28}{'kind':<22}{'output':<20}{'params':>9}{'GFLOP f+b':>11}{'out MB':>9}{'cut MB':>9}")
    for i, op in enumerate(dag.ops):
        shape = "x".join(map(str, op.out_shapes[0])) + ("+" if len(op.out_shapes) > 1 else "") if op.out_shapes else "-"
        print(f"{i:>4}  {op.name[:27]:<28}{op.kind[:21]:<22}{shape[:19]:<20}{_human(op.n_params):>9}"
              f"{op.flops / 1e9:>11.3f}{op.out_bytes / 1e6:>9.3f}{cuts[i] / 1e6:>9.3f}")
    print(f"model {dag.model}: {len(dag)} ops ({dag.granularity}), {_human(sum(op.n_params for op in dag.ops))} params "
          f"({dag.param_bytes / 1e6:.1f} MB), {dag.total_flops / 1e9:.2f} GFLOP per batch of {dag.batch_size} "
          f"(forward+backward), largest cut {cuts[largest] / 1e6:.3f} MB after {dag.ops[largest].name}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from swarm.estimator.profile import load_or_measure

    profile = load_or_measure(args.device or "auto", refresh=args.refresh)
    if args.json:
        print(json.dumps(profile.to_dict()))
        return 0
    print(f"device      {profile.device} ({profile.name}), {profile.threads} threads, torch {profile.torch_version}")
    print("matmul      " + "  ".join(f"n={2 ** k}: {v:.3f}" for k, v in sorted(profile.matmul_tflops.items())) + "  TFLOP/s")
    print(f"memory      {profile.memory_available_bytes / 2**30:.1f} GiB available of {profile.memory_total_bytes / 2**30:.1f} GiB, "
          f"{profile.mem_bandwidth_gbps:.1f} GB/s")
    print(f"overhead    {profile.kernel_overhead_us:.2f} us per kernel; calibration x{profile.calibration:.2f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: a private swarm of node processes on loopback trains a model."""
    from swarm import logs
    from swarm.demo import DemoSettings, run_demo

    logs.setup()

    run_demo(DemoSettings(nodes=args.nodes, steps=args.steps, model=args.model, stages=args.stages,
                          compression=args.compression, micro_batches=args.micro_batches,
                          micro_batch_size=args.micro_batch_size, warmup_steps=args.warmup_steps, out_dir=args.out_dir,
                          json_out=args.json_out, plot=args.plot, device=args.device, config=args.config,
                          input_shape=args.input_shape))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from swarm.scheduler import Workload, baseline, best_alone, schedule
    from swarm.scheduler.whatif import load_peers_file

    cfg = _node_config(args)
    swarm, settings, micro_batch_size = load_peers_file(args.peers)
    dag = _trace(cfg, micro_batch_size or cfg.micro_batch_size).dag
    workload = Workload.from_dag(dag)
    plan, naive = schedule(workload, swarm, settings), baseline(workload, swarm, settings)
    alone = best_alone(workload, swarm, settings)
    speedup = naive.predicted_step_s / plan.predicted_step_s if plan.feasible else 0.0
    if args.json:
        print(json.dumps({**plan.to_dict(), "hash": plan.hash, "speedup": speedup if plan.feasible and naive.feasible else None,
                          "baseline": {**naive.to_dict(), "hash": naive.hash},
                          "best_single": {**alone.to_dict(), "hash": alone.hash} if alone else None}))
        return 0 if plan.feasible else 1
    print(f"{dag.model}: {len(dag)} ops, {len(swarm.peers)} peers, micro-batch {dag.batch_size} x {settings.micro_batches}")
    print(plan.describe())
    print(f"plan {plan.hash}")
    naive_text = f"{naive.predicted_step_s:.3f} s" if naive.feasible else "does not fit in memory"
    print(f"naive baseline (one peer per stage in id order, equal op counts, no compression): {naive_text}"
          + (f"; OP-Fence is {speedup:.1f}x faster" if plan.feasible and naive.feasible else ""))
    if alone is not None and plan.feasible:
        print(f"best single peer ({alone.stages[0].peers[0]}) alone: {alone.predicted_samples_per_s:.1f} samples/s; "
              f"the plan: {plan.predicted_samples_per_s / alone.predicted_samples_per_s:.1f}x that, "
              f"utilization {plan.utilization:.2f} (alone: {alone.utilization:.2f})")
    if not plan.feasible:
        print("error: no plan fits the model in these peers' memory", file=sys.stderr)
        return 1
    return 0


def _network(args: argparse.Namespace):
    cfg = _node_config(args)
    flags = {"initial_peers": args.initial_peers, "host_maddrs": getattr(args, "host_maddrs", None),
             "announce_maddrs": getattr(args, "announce_maddrs", None), "identity_path": getattr(args, "identity", None),
             "prefix": args.prefix, "credentials_path": args.credentials}
    return cfg, validate(NetworkConfig, {**cfg.network.model_dump(), **{k: v for k, v in flags.items() if v is not None}},
                         "command-line flags")


def check_local_dirs(cfg: NodeConfig) -> None:
    """At start, before anything joins a swarm: the directories the node will write are usable."""
    from swarm.runtime.state import check_writable_dir

    for key in ("checkpoint_dir", "save_dir"):
        if getattr(cfg.training, key):
            check_writable_dir(getattr(cfg.training, key), f"training.{key}")


def cmd_run(args: argparse.Namespace) -> int:
    from swarm import logs
    from swarm.node import run_node

    logs.setup()
    cfg, net = _network(args)
    check_local_dirs(cfg)
    return run_node(cfg, net, ready_file=args.ready_file)


def cmd_status(args: argparse.Namespace) -> int:
    from swarm.node import read_members
    from swarm.node.status import member_json, status_lines

    _, net = _network(args)
    view = read_members(net)
    records = [view.members[p] for p in view.peers()]
    if args.json:
        print(json.dumps(member_json(records)))
        return 0
    for line in status_lines(view, records):
        print(line)
    print(f"{len(records)} members")
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    from swarm.net.auth import load_identity

    identity = load_identity(args.identity)
    if args.json:
        print(json.dumps({"peer_id": identity.peer_id, "public_key": identity.public_key, "path": identity.path}))
    else:
        print(f"peer id     {identity.peer_id}\npublic key  {identity.public_key}\nfile        {identity.path}")
    return 0


def cmd_swarm_init(args: argparse.Namespace) -> int:
    from swarm.net.private import init_swarm

    made = init_swarm(args.dir, args.name, args.members, args.valid_days)
    print(f"private swarm '{args.name}' in {args.dir}: keep {made.authority_path} secret and offline")
    for member in made.members:
        print(f"  member {member.peer_id}: --identity {member.identity_path} --credentials {member.credential_path}")
    print(f"admit more members with: node.py swarm-admit {args.dir} --public-key 'ssh-rsa ...' --out FILE")
    return 0


def cmd_swarm_admit(args: argparse.Namespace) -> int:
    from swarm.net.auth import load_identity
    from swarm.net.private import admit

    if bool(args.public_key) == bool(args.identity):
        raise SwarmError("swarm-admit needs exactly one of --public-key and --identity")
    key = args.public_key or load_identity(args.identity, create=False).public_key
    cred = admit(args.dir, key, args.out, args.valid_days)
    print(f"admitted peer {cred.peer_id} to '{cred.swarm}' until {cred.token.expiration_time}: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="node.py", description="swarm: train deep networks together, peer to peer")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help=f"node config YAML (default values: {config_dir() / 'node.yaml'})")
        p.add_argument("--model", help="preset name, model YAML, or package.module:factory")
        _input_shape_arg(p)
        p.add_argument("--granularity", choices=["fine", "coarse"], help="OP-DAG granularity")

    p = sub.add_parser("dag", help="trace a model into its OP-DAG and print it")
    model_args(p)
    p.add_argument("--batch-size", type=_at_least(1), default=1, help="samples in the traced batch (costs scale with it)")
    p.add_argument("--json", action="store_true", help="print the OP-DAG as JSON")
    p.set_defaults(func=cmd_dag)

    p = sub.add_parser("plan", help="what-if planning: the OP-Fence plan for hypothetical peers")
    model_args(p)
    p.add_argument("--peers", required=True, metavar="PEERS.yaml", help="hypothetical peers (see configs/peers/)")
    p.add_argument("--json", action="store_true", help="print the plan and the naive baseline as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("profile", help="measure this device (cached) and print its profile")
    p.add_argument("--device", type=_device)
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    def network_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--initial-peers", nargs="*", metavar="MADDR",
                       help="bootstrap peers (default: bootstrap/peers.txt); none: start a new swarm")
        p.add_argument("--prefix", help="DHT key prefix of the swarm (default: swarm)")
        p.add_argument("--credentials", metavar="FILE", help="private swarm: this node's credential file")

    p = sub.add_parser("run", help="start a node: join the swarm and advertise this device")
    p.add_argument("--config", help="node config YAML")
    network_args(p)
    p.add_argument("--host-maddrs", nargs="+", metavar="MADDR", help="addresses to listen on")
    p.add_argument("--announce-maddrs", nargs="+", metavar="MADDR", help="addresses others should dial")
    p.add_argument("--identity", metavar="PATH", help="identity file (same file, same peer id)")
    p.add_argument("--device", type=_device)
    p.add_argument("--max-memory", type=_at_least(0.001, float), metavar="GB", help="memory_limit_gb: advertise at most this")
    p.add_argument("--ready-file", metavar="PATH", help="JSON the node keeps up to date for programs that start it: "
                   "peer_id, maddrs, state, role, stage, step, plan_hash, pid, updated_at (written atomically)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="join as a client, print the member table and exit")
    p.add_argument("--config", help="node config YAML")
    network_args(p)
    p.add_argument("--identity", metavar="PATH", help="private swarm: the identity the credential belongs to")
    p.add_argument("--json", action="store_true", help="print a list of member objects")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("identity", help="print this node's peer id and public key (creating the identity if needed)")
    p.add_argument("--identity", metavar="PATH", default="~/.swarm/identity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser("swarm-init", help="create a private swarm: authority key and member credentials")
    p.add_argument("dir", help="new directory for the swarm's keys (must not exist or be empty)")
    p.add_argument("--name", default="private", help="the swarm's name (shown in credentials)")
    p.add_argument("--members", type=_at_least(0), default=0, help="also create this many member identities + credentials")
    p.add_argument("--valid-days", type=_at_least(0.001, float), default=365.0, help="credential lifetime")
    p.set_defaults(func=cmd_swarm_init)

    p = sub.add_parser("swarm-admit", help="issue a credential for one more member of a private swarm")
    p.add_argument("dir", help="the directory made by swarm-init (holds the authority key)")
    p.add_argument("--public-key", help="the member's public key, as printed by `node.py identity`")
    p.add_argument("--identity", metavar="PATH", help="or: the member's identity file")
    p.add_argument("--out", required=True, help="credential file to write")
    p.add_argument("--valid-days", type=_at_least(0.001, float), default=365.0)
    p.set_defaults(func=cmd_swarm_admit)

    p = sub.add_parser("demo", help="the main job: a local private swarm of node processes trains a model")
    p.add_argument("--config", help="node config YAML the nodes start from, e.g. configs/resnet-demo.yaml "
                   "(the flags below override it; defaults in brackets apply where neither sets a value)")
    p.add_argument("--nodes", type=_at_least(1), default=4, help="node processes to start on loopback")
    p.add_argument("--steps", type=_at_least(1), default=100, help="optimizer steps to train")
    p.add_argument("--model", help="preset name, model YAML, or package.module:factory [gpt2-tiny]")
    _input_shape_arg(p)
    p.add_argument("--stages", type=_at_least(0), help="pipeline stages [0: elected by the swarm]")
    p.add_argument("--compression", metavar="auto|off|RATIO",
                   help="AdaTopK on pipeline links: auto (per link, from bandwidth), off, or a fixed wire ratio [auto]")
    p.add_argument("--micro-batches", type=_at_least(1), help="micro-batches per step [8]")
    p.add_argument("--micro-batch-size", type=_at_least(1), help="[4]")
    p.add_argument("--warmup-steps", type=_at_least(0), help="uncompressed steps before AdaTopK starts [5]")
    p.add_argument("--device", type=_device, help="[cpu]")
    p.add_argument("--out-dir", default="demo-out", help="node logs, keys, config, metrics and plot")
    p.add_argument("--json-out", metavar="FILE", help="metrics JSON (default: OUT_DIR/metrics.json)")
    p.add_argument("--plot", metavar="FILE", help="loss/throughput PNG (default: OUT_DIR/demo.png)")
    p.set_defaults(func=cmd_demo)
    add_commands(sub, _at_least)   # export, generate, eval
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if os.getcwd() not in sys.path:   # a user's model or data module in the current directory resolves (as with -m)
        sys.path.insert(1, os.getcwd())
    args = build_parser().parse_args(argv)
    logging.getLogger("hivemind").setLevel(logging.WARNING)  # its INFO chatter is not for users
    try:
        return args.func(args)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
