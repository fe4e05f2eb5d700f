"""Hugging Face causal LMs cut at decoder layers (``kind: hf``; ``pip install swarm[hf]``).

``HFCausalLM`` wraps a transformers model as a chain of blocks: the embedding (token and, for GPT-2,
learned positions), each decoder layer, and the head (final norm and LM head). Only hidden states
``[batch, tokens, d_model]`` cross a block boundary: every layer recomputes its positions, its
causal mask (transformers' own ``create_causal_mask``) and, for rotary models, its cos/sin tables
from the sequence length, so any cut between blocks gives the whole model's outputs and gradients.
The chain is traced as a layer list (``sequential_modules``), never by torch.fx (which cannot trace
these models). Architectures: GPT-2 (``model_type: gpt2``) and the Llama family (llama, qwen2,
qwen3, mistral: RoPE, grouped-query attention, RMSNorm). Tied embeddings are untied: the first and
the last stage each own a copy, as ``tie_word_embeddings: false`` in the config they export.
Models are built from a local directory holding ``config.json`` and, if any, weights
(``save_pretrained``'s safetensors); nothing is downloaded.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from swarm.errors import SwarmError

LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral")
ARCHITECTURES = ("gpt2", *LLAMA_LIKE)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SwarmError("kind: hf needs the transformers package: pip install 'swarm[hf]'") from None
    return transformers


def load_config(path: str | Path):
    """The transformers config of the directory ``path`` (one line when it is missing, broken or of an
    architecture this module does not cut)."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SwarmError(f"hf model directory {path} holds no config.json")
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:   # transformers raises OSError, ValueError, KeyError, JSON errors ...
        raise SwarmError(f"hf model directory {path}: config.json does not load ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None
    if config.model_type not in ARCHITECTURES:
        raise SwarmError(f"hf model directory {path}: architecture '{config.model_type}' is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    config.tie_word_embeddings = False
    config._attn_implementation = "sdpa"
    return config


def weights_in(path: str | Path) -> Path | None:
    """The weights file of an HF directory, if it holds one."""
    return next((Path(path) / f for f in WEIGHT_FILES if (Path(path) / f).is_file()), None)


def load_hf(path: str | Path, weights: str = "auto", seed: int = 0) -> nn.Module:
    """The transformers causal LM of ``path``: its weights (``weights``: auto loads them when the
    directory holds some; required refuses a directory without; none ignores them) or a seeded random
    initialisation from its config."""
    tf = _transformers()
    config = load_config(path)
    found = weights_in(path)
    if weights == "required" and found is None:
        raise SwarmError(f"hf model directory {path} holds no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                         "set weights: auto or none to start from a random initialisation")
    if found is not None and weights != "none":
        try:
            return tf.AutoModelForCausalLM.from_pretrained(str(path), config=config, local_files_only=True,
                                                           dtype=torch.float32)
        except Exception as e:
            raise SwarmError(f"hf model directory {path}: weights do not load ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]})") from None
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class _Embed(nn.Module):
    def __init__(self, hf: nn.Module, gpt2: bool):
        super().__init__()
        body = hf.transformer if gpt2 else hf.model
        self.tokens = body.wte if gpt2 else body.embed_tokens
        self.positions = body.wpe if gpt2 else None
        self.drop = body.drop if gpt2 else nn.Identity()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tokens(idx)
        if self.positions is not None:
            h = h + self.positions(torch.arange(idx.shape[1], device=idx.device))[None]
        return self.drop(h)


class _Layer(nn.Module):
    """One decoder layer; positions, the causal mask and (RoPE) cos/sin recomputed from the input."""

    def __init__(self, hf: nn.Module, index: int, gpt2: bool):
        from transformers.masking_utils import create_causal_mask

        super().__init__()
        self.causal_mask = create_causal_mask
        body = hf.transformer if gpt2 else hf.model
        self.config = hf.config
        self.layer = body.h[index] if gpt2 else body.layers[index]
        self.rotary = None if gpt2 else copy.deepcopy(body.rotary_emb)   # buffers only: each stage its own

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(h.shape[1], device=h.device)[None]
        mask = self.causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=positions)
        if self.rotary is None:
            return self.layer(h, None, mask, position_ids=positions)
        return self.layer(h, attention_mask=mask, position_ids=positions,
                          position_embeddings=self.rotary(h, position_ids=positions))


class _Head(nn.Module):
    def __init__(self, hf: nn.Module, gpt2: bool):
        super().__init__()
        self.norm = hf.transformer.ln_f if gpt2 else hf.model.norm
        self.lm_head = hf.lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


class HFCausalLM(nn.Module):
    """``hf`` (a transformers causal LM) as ``blocks``: embedding, decoder layers, head; ``forward``
    maps token ids ``[batch, tokens]`` to logits like ``hf(input_ids).logits``."""

    def __init__(self, hf: nn.Module, seq_len: int):
        super().__init__()
        gpt2 = hf.config.model_type == "gpt2"
        layers = hf.config.n_layer if gpt2 else hf.config.num_hidden_layers
        self.hf_config, self.seq_len, self.vocab_size = hf.config, seq_len, hf.config.vocab_size
        self.blocks = nn.ModuleList([_Embed(hf, gpt2), *(_Layer(hf, i, gpt2) for i in range(layers)), _Head(hf, gpt2)])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = idx
        for block in self.blocks:
            h = block(h)
        return h

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, self.vocab_size, (batch_size, self.seq_len)),)

    def block_names(self) -> list[str]:
        """The layer list the chain is traced as."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def save_pretrained(self, export: Path, weights: dict[str, torch.Tensor]) -> str:
        """Beside the export file ``export``: a transformers directory (``<export>.hf``: config.json and
        model.safetensors, ``from_pretrained`` reads it) of ``weights``; what to add to the export's line."""
        directory = export.with_name(export.name + ".hf")
        self.hf_model(weights).save_pretrained(str(directory))
        return f"; transformers directory {directory}"

    def hf_model(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A fresh transformers model of this config holding this chain's parameters (or ``weights``,
        named as this module's ``state_dict``): what ``save_pretrained`` writes."""
        tf = _transformers()
        torch.manual_seed(0)
        hf = tf.AutoModelForCausalLM.from_config(copy.deepcopy(self.hf_config), dtype=torch.float32)
        HFCausalLM(hf, self.seq_len).load_state_dict(weights if weights is not None else self.state_dict())
        return hf


def max_positions(config) -> int:
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0) or 1 << 17)
