"""moe_lib: the Mixture-of-Experts library behind the MoE book."""

from moe_lib.capacity import apply_capacity, expert_capacity
from moe_lib.experts import ExpertBank, FeedForward
from moe_lib.layer import MoE, MoEOutput
from moe_lib.routing import DenseRouter, NoisyTopKRouter, Routing, TopKRouter

__all__ = [
    "DenseRouter",
    "ExpertBank",
    "FeedForward",
    "MoE",
    "MoEOutput",
    "NoisyTopKRouter",
    "Routing",
    "TopKRouter",
    "apply_capacity",
    "expert_capacity",
]
__version__ = "0.1.0"
