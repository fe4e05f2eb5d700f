"""Taking a trained model out of the swarm: one safetensors file, and what reads it (docs/export.md).

``write_spec`` puts ``model.json`` (the resolved model spec: rebuilding needs no preset file) beside the stages'
checkpoints or saves; ``export`` writes every stage's newest tensors as ONE safetensors file whose metadata holds
the spec; ``load_exported`` reads it back as a plain module; ``generate`` samples bytes from an exported byte-level
LM, ``evaluate`` measures a validation loss; ``add_commands``: ``node.py export`` / ``generate`` / ``eval``.
torch and the models are imported where they are used: the CLI reads this module's defaults at every start.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.errors import SwarmError

if TYPE_CHECKING:
    import torch

    from swarm.models import BuiltModel

logger = logging.getLogger(__name__)

SPEC_FILE = "model.json"   # written by write_spec into a save or checkpoint directory
FORMAT = 1                 # version of model.json and of an export's metadata
GRANULARITY = "coarse"     # the OP-DAG granularity a spec is recorded with unless told otherwise
TOKENS, TEMPERATURE, TOP_K = 200, 0.8, 40   # generate
EVAL_BATCHES, EVAL_BATCH_SIZE = 10, 8       # eval
META_MODEL, META_STEP, META_SOURCE = "swarm.model", "swarm.step", "swarm.source"   # safetensors metadata keys
_STAGE_FILE = re.compile(r"stage\d+-.+\.pt")   # TrainingSession.save: stage<k>-<peer>.pt
_PREVIEW = 6               # names a message shows before "..."


def _why(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _names(names: list[str]) -> str:
    return ", ".join(names[:_PREVIEW]) + (f", ... ({len(names)} in all)" if len(names) > _PREVIEW else "")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` then rename it to ``path``: a reader (or another node writing it) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise SwarmError(f"cannot write {path}: {e.strerror or _why(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def spec_doc(model: str, granularity: str = GRANULARITY) -> dict[str, Any]:
    """What ``model.json`` holds for ``model`` (a preset, a model YAML, ``package.module:factory``)."""
    from swarm.models import resolve

    if granularity not in ("fine", "coarse"):
        raise SwarmError(f"granularity must be fine or coarse, not {granularity!r}")
    return {"format": FORMAT, "model": model, "granularity": granularity, "spec": resolve(model).model_dump(mode="json")}


def write_spec(directory: str | Path, model: str, granularity: str = GRANULARITY) -> Path:
    """Write ``directory/model.json`` (every node may write it, with the same content) and return its path."""
    text = json.dumps(spec_doc(model, granularity), indent=1) + "\n"
    return _write_atomically(Path(directory) / SPEC_FILE, lambda tmp: tmp.write_text(text))


def read_spec(directory: Path) -> dict[str, Any]:
    path = directory / SPEC_FILE
    if not path.is_file():
        raise SwarmError(f"{directory} has no {SPEC_FILE} (nodes that save or checkpoint write it): name the model with --model")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SwarmError(f"cannot read {path}: {_why(e)}") from None


def _spec(doc: Any, where: str):
    """The validated spec, and granularity, of a ``model.json`` document."""
    from swarm.config import validate
    from swarm.models import SPECS as kinds

    spec = doc.get("spec") if isinstance(doc, dict) else None
    if not isinstance(spec, dict) or spec.get("kind") not in kinds:
        raise SwarmError(f"{where}: not a swarm model spec (no 'spec' with a kind of {', '.join(kinds)})")
    if doc.get("format") != FORMAT:
        raise SwarmError(f"{where}: model spec format {doc.get('format')!r}; this swarm reads format {FORMAT}")
    return validate(kinds[spec["kind"]], spec, where), doc.get("granularity", GRANULARITY)


class Target:
    """The model rebuilt from its spec: the tensors it needs (one per tied group, by its first name) and their shapes."""

    def __init__(self, doc: dict[str, Any], where: str):
        from swarm.models import build

        self.spec, self.granularity = _spec(doc, where)
        self.name = self.spec.name or self.spec.kind
        self.built: BuiltModel = build(self.spec)
        first: dict[tuple, str] = {}
        self.canonical: dict[str, str] = {}   # state_dict name -> the name it is stored under
        for name, t in self.built.module.state_dict().items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else (name,)
            self.canonical[name] = first.setdefault(key, name)
        self.shapes = {name: list(t.shape) for name, t in self.built.module.state_dict().items()}

    def missing(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Stored names none of whose group is in ``tensors``."""
        present = {self.canonical[n] for n in tensors if n in self.canonical}
        return [n for n in dict.fromkeys(self.canonical.values()) if n not in present]

    def complete(self, tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """``tensors`` by stored name, once checked to be exactly this model's: else one line."""
        if missing := self.missing(tensors):
            raise SwarmError(f"{what} lacks {len(missing)} tensors of model {self.name}: {_names(missing)}")
        if extra := [n for n in tensors if n not in self.canonical]:
            raise SwarmError(f"{what} holds tensors model {self.name} does not have ({_names(extra)}): another model's?")
        out: dict[str, torch.Tensor] = {}
        for n, t in tensors.items():
            if list(t.shape) != self.shapes[n]:
                raise SwarmError(f"{what}: tensor '{n}' has shape {list(t.shape)}, model {self.name} expects {self.shapes[n]}")
            out.setdefault(self.canonical[n], t.contiguous())
        return out

    def ops_owning(self, names: list[str]) -> list[str]:
        """The OP-DAG ops (at the spec's granularity) that own ``names``; [] if the model cannot be traced here."""
        from swarm.dag.trace import trace
        from swarm.runtime.state import op_tensors

        try:
            traced = trace(self.built.module, self.built.example_inputs(2), self.granularity, self.spec.sequential_modules)
        except Exception as e:   # naming ops is a courtesy of an error message
            logger.debug("cannot trace %s to name its ops: %s", self.name, _why(e))
            return []
        owner = {self.canonical.get(n, n): op for op, pairs in op_tensors(traced.dag, traced.gm).items() for _, n in pairs}
        return list(dict.fromkeys(owner[n] for n in names if n in owner))


@dataclass
class Found:   # the tensors (by qualified name) that a directory holds of one step
    step: int
    source: str   # "checkpoint" or "save-dir"
    where: str    # which files: a step directory, or the stage files picked
    tensors: dict[str, torch.Tensor]


def _read_step(step: int, directory: Path) -> Found:
    """A checkpoint step's parameters (``p:``) and buffers (``b:``); optimizer (``o:``) and gradient (``g:``) entries are not the model."""
    from swarm.runtime.state import _load

    tensors = {}
    for f in sorted(directory.glob("*.pt")):
        try:
            state = _load(f)
        except Exception as e:   # truncated, corrupt, or not ours
            raise SwarmError(f"{directory.name}: cannot read {f.name} ({_why(e)})") from None
        tensors |= {k[2:]: t for k, t in state.tensors.items() if k[:2] in ("p:", "b:")}
    return Found(step, "checkpoint", directory.name, tensors)


def _read_saves(files: list[Path]) -> Found:
    """The newest replica of each saved stage (``stage<k>-<peer>.pt``), all stages at one step: else one line."""
    import torch

    picked: dict[int, tuple[int, Path, dict]] = {}
    for f in files:
        try:
            data = torch.load(f, map_location="cpu", weights_only=True)
            step, stage, state = int(data["step"]), int(data["stage"]), dict(data["state"])
        except Exception as e:
            raise SwarmError(f"cannot read saved stage {f}: {_why(e)}") from None
        if stage not in picked or step > picked[stage][0]:
            picked[stage] = (step, f, state)
    steps = {s: picked[s][0] for s in sorted(picked)}
    if len(set(steps.values())) > 1:
        raise SwarmError(f"{files[0].parent}: the saved stages are at different steps "
                         f"({', '.join(f'stage {s} at step {n}' for s, n in steps.items())}): export once all have saved one")
    return Found(next(iter(steps.values())), "save-dir", ", ".join(picked[s][1].name for s in steps),
                 {k: t for _, _, state in picked.values() for k, t in state.items()})


def _candidates(root: Path) -> list[Callable[[], Found]]:
    """Readers of the steps ``root`` holds, newest first (a save before a checkpoint of its step)."""
    from swarm.runtime.state import _step_dirs

    if not root.is_dir():
        raise SwarmError(f"{root} {'is not a directory' if root.exists() else 'does not exist'}")
    out: list[tuple[float, Callable[[], Found]]] = [(s, functools.partial(_read_step, s, d)) for s, d in _step_dirs(root)]
    if saves := sorted(f for f in root.glob("stage*.pt") if _STAGE_FILE.fullmatch(f.name)):
        found = _read_saves(saves)
        out.append((found.step + 0.5, lambda: found))
    if not out:
        raise SwarmError(f"{root} holds no checkpoint (step-<N>/ directories) and no saved stages (stage<k>-<peer>.pt)")
    return [read for _, read in sorted(out, key=lambda c: -c[0])]


def _newest_complete(root: Path, candidates: list[Callable[[], Found]], target: Target) -> Found:
    """The newest step holding all of ``target``; else one line naming the ops and parameters the newest one lacks."""
    newest, unreadable = None, []
    for read in candidates:
        try:
            found = read()
        except SwarmError as e:
            unreadable.append(str(e))
            continue
        if not (missing := target.missing(found.tensors)):
            if newest or unreadable:
                logger.warning("%s: exporting step %d; newer steps are incomplete or unreadable", root, found.step)
            return found
        newest = newest or (found, missing)
    if newest is None:
        raise SwarmError(f"{root}: no readable step ({'; '.join(unreadable[:2])})")
    (found, missing), ops = newest, target.ops_owning(newest[1])
    raise SwarmError(f"{root}: {found.where} (the newest readable step, {found.step}) lacks " + (f"ops {_names(ops)}; " if ops else "")
                     + f"parameters {_names(missing)}" + ("; older steps too" if len(candidates) > 1 else "")
                     + ": a stage that never wrote its part?")


@dataclass
class Exported:
    path: Path
    step: int
    summary: str   # one line: the model, its size, its step and where it came from


def export(source_dir: str | Path, out_file: str | Path, model: str | None = None) -> Exported:
    """``source_dir``'s (a checkpoint or save dir) newest whole step as ONE safetensors file, the spec in its metadata."""
    from safetensors.torch import save_file

    root = Path(source_dir)
    candidates = _candidates(root)   # a directory with nothing in it says so before asking for a spec
    doc = spec_doc(model) if model else read_spec(root)
    target = Target(doc, f"--model {model}" if model else str(root / SPEC_FILE))
    found = _newest_complete(root, candidates, target)
    tensors = target.complete(found.tensors, f"{root}: {found.where}")
    meta = {"format": "pt", META_MODEL: json.dumps(doc), META_STEP: str(found.step), META_SOURCE: found.source}
    out = _write_atomically(Path(out_file), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    params = sum(p.numel() for p in target.built.module.parameters())
    also = target.built.module.save_pretrained(out, {n: tensors[c] for n, c in target.canonical.items()}) \
        if hasattr(target.built.module, "save_pretrained") else ""   # (kind: hf: its directory too)
    return Exported(out, found.step, f"exported model {target.name}: {params:,} parameters in {len(tensors)} tensors, "
                                     f"step {found.step}, from {found.source} {root} ({found.where}){also}")


def read_export(path: str | Path) -> tuple[dict[str, Any], int, dict[str, torch.Tensor]]:
    """(model spec document, step, tensors) of a file written by ``export``: anything else is one line."""
    from safetensors import safe_open

    p, hint = Path(path), "give a file written by `node.py export`"
    if not p.is_file():
        raise SwarmError(f"{path} {'is not a file' if p.exists() else 'does not exist'}: {hint}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if META_MODEL in meta else {}
    except Exception as e:   # SafetensorError: not this format at all
        raise SwarmError(f"{path} is not a safetensors file ({_why(e)}): {hint}") from None
    if META_MODEL not in meta:
        raise SwarmError(f"{path} is a safetensors file without swarm metadata ({META_MODEL}): {hint}")
    try:
        return json.loads(meta[META_MODEL]), int(meta.get(META_STEP, 0)), tensors
    except ValueError as e:
        raise SwarmError(f"{path}: unreadable swarm metadata ({_why(e)})") from None


def load_built(path: str | Path) -> tuple[BuiltModel, Target, int]:
    """The exported model (its tensors loaded strictly, in eval mode), its target and its step."""
    doc, step, tensors = read_export(path)
    target = Target(doc, f"{path} (metadata)")
    stored = target.complete(tensors, str(path))   # names and shapes checked: strict loading cannot fail below
    target.built.module.load_state_dict({n: stored[c] for n, c in target.canonical.items()}, strict=True)
    target.built.module.eval()
    return target.built, target, step


def load_exported(path: str | Path) -> torch.nn.Module:
    """``swarm.load_exported(FILE)``: the model of a file written by ``node.py export``, a plain module in eval mode."""
    return load_built(path)[0].module


def lm_shape(target: Target) -> tuple[int, int]:
    """(vocabulary, context length) of a byte-level language model; anything else is one line."""
    spec = target.spec
    if spec.kind in ("gpt", "hf"):
        vocab, seq_len = target.built.module.vocab_size, target.built.module.seq_len
    elif spec.kind == "import" and spec.input_dtype == "int64" and len(spec.input_shape or []) == 1:
        vocab, seq_len = spec.input_high, spec.input_shape[0]
    else:
        raise SwarmError(f"model {target.name} ({spec.kind}) is not a language model: generate needs token ids in, logits out")
    if vocab > 256:
        raise SwarmError(f"model {target.name} has a vocabulary of {vocab} tokens, not bytes: generate reads and writes bytes")
    return vocab, seq_len


def encode_prompt(text: str, vocab: int) -> list[int]:
    """The prompt's UTF-8 bytes, each one a token of a ``vocab``-byte vocabulary: else one line."""
    if not text:
        raise SwarmError("the prompt is empty: give at least one character to continue")
    if bad := next((ch for ch in text if max(ch.encode()) >= vocab), None):
        raise SwarmError(f"the prompt's character {bad!r} (bytes {bad.encode().hex(' ')}) is outside the model's {vocab}-byte vocabulary")
    return list(text.encode())


def sample(module: torch.nn.Module, ids: list[int], tokens: int, seq_len: int, vocab: int, temperature: float = TEMPERATURE,
           top_k: int = TOP_K, seed: int | None = None) -> list[int]:
    """``tokens`` new ids after ``ids`` (the context cropped to ``seq_len``); temperature 0 is greedy, top_k 0 all."""
    import torch

    gen, out = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed), list(ids)
    with torch.no_grad():
        for _ in range(tokens):
            logits = module(torch.tensor([out[-seq_len:]]))[0, -1, :vocab].float()
            if temperature == 0:
                out.append(int(logits.argmax()))
                continue
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
            out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    return out[len(ids):]


def generate(path: str | Path, prompt: str, tokens: int = TOKENS, temperature: float = TEMPERATURE, top_k: int = TOP_K,
             seed: int | None = None) -> str:
    """The prompt and ``tokens`` bytes sampled after it from an exported byte-level LM, decoded (errors replaced)."""
    built, target, _ = load_built(path)
    vocab, seq_len = lm_shape(target)
    ids = encode_prompt(prompt, vocab)
    return bytes(ids + sample(built.module, ids, tokens, seq_len, vocab, temperature, top_k, seed)).decode(errors="replace")


def evaluate(path: str | Path, source: str, batches: int = EVAL_BATCHES, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, Any]:
    """Mean loss on ``source``'s validation split (+ perplexity and bits/byte for an LM, accuracy for a classifier)."""
    import torch

    from swarm.data import bits_per_byte, lm_loss, perplexity, validation_data

    built, target, step = load_built(path)
    with torch.no_grad():
        example = built.example_inputs(1)
        if len(example) != 1:
            raise SwarmError(f"eval feeds one input; model {target.name} takes {len(example)}")
        x, out_shape, dtype = example[0], list(built.module(*example).shape), str(example[0].dtype).removeprefix("torch.")
    try:
        data = validation_data(source, list(x.shape), dtype, out_shape, batches, batch_size)
    except SwarmError as e:
        raise SwarmError(f"eval data: {e}") from None
    lm = dtype == "int64" and x.dim() == 2
    loss_fn, total, right, seen = lm_loss if lm else torch.nn.functional.cross_entropy, 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in data:
            logits = built.module(inputs)
            total += float(loss_fn(logits, targets)) * len(targets)
            right, seen = right + int((logits.argmax(-1) == targets).sum()), seen + len(targets)
    loss = total / seen
    out = {"model": target.name, "step": step, "data": source, "batches": batches, "batch_size": batch_size, "loss": loss}
    return out | ({"perplexity": perplexity(loss), "bits_per_byte": bits_per_byte(loss)} if lm else {"accuracy": right / seen})


def describe_eval(result: dict[str, Any]) -> str:
    more = (f", perplexity {result['perplexity']:.4g}, {result['bits_per_byte']:.4f} bits/byte" if "perplexity" in result
            else f", accuracy {result['accuracy']:.2%}")
    return (f"model {result['model']} (step {result['step']}) on {result['data']} (validation): loss {result['loss']:.4f}{more} "
            f"({result['batches']} batches of {result['batch_size']})")


def add_commands(sub, number: Callable[..., Callable[[str], Any]]) -> None:
    """``node.py export`` / ``generate`` / ``eval``; ``number(low, kind)`` is the CLI's bounded-number type."""
    p = sub.add_parser("export", help="a checkpoint or save directory as ONE safetensors file (docs/export.md)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="training.checkpoint_dir or training.save_dir")
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--model", help=f"when DIR has no {SPEC_FILE}: preset name, model YAML, or package.module:factory")
    p.set_defaults(func=lambda a: print("{0.path}\n{0.summary}".format(export(a.checkpoint, a.out, a.model))) or 0)

    p = sub.add_parser("generate", help="sample text from an exported byte-level language model")
    p.add_argument("--model", required=True, metavar="FILE", help="a file written by `node.py export`")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=number(1), default=TOKENS, help="bytes to generate")
    p.add_argument("--temperature", type=number(0, float), default=TEMPERATURE, help="0: always the likeliest byte")
    p.add_argument("--top-k", type=number(0), default=TOP_K, help="sample among the K likeliest bytes (0: all)")
    p.add_argument("--seed", type=int, help="the same seed gives the same text")
    p.set_defaults(func=lambda a: print(generate(a.model, a.prompt, a.tokens, a.temperature, a.top_k, a.seed)) or 0)

    p = sub.add_parser("eval", help="validation loss of an exported model (perplexity for LMs, accuracy for classifiers)")
    p.add_argument("--model", required=True, metavar="FILE", help="a file written by `node.py export`")
    p.add_argument("--data", required=True, metavar="SOURCE", help="as training.data (its validation split is used)")
    p.add_argument("--batches", type=number(1), default=EVAL_BATCHES)
    p.add_argument("--batch-size", type=number(1), default=EVAL_BATCH_SIZE)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=lambda a: print((json.dumps if a.json else describe_eval)(evaluate(a.model, a.data, a.batches, a.batch_size))) or 0)
