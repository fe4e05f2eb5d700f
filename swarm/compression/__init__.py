"""AdaTopK compression of activations and gradients (pure torch/numpy, no networking)."""
from swarm.compression.adatopk import Packet, decode, encode, encode_like, keep_for_ratio

__all__ = ["Packet", "decode", "encode", "encode_like", "keep_for_ratio"]
