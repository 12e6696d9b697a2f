"""moe_lib: the Mixture-of-Experts library behind the MoE book.

The core (layers, routers, capacity, losses, statistics, kernels) needs torch and numpy only;
``moe_lib.plot``, ``moe_lib.widgets``, ``moe_lib.notebook`` and ``moe_lib.train`` need the
``book`` extra (``pip install "moe_lib[book]"``). The benchmarks are in ``moe_lib.bench``.
"""

from moe_lib.capacity import apply_capacity, expert_capacity
from moe_lib.config import MoEConfig
from moe_lib.experts import ExpertBank, FeedForward
from moe_lib.layer import MoE, MoEOutput, ParameterCounts
from moe_lib.permute import Permutation
from moe_lib.routers import DenseRouter, ExpertChoiceRouter, NoisyTopKRouter, TopKRouter
from moe_lib.routing import Routing

__all__ = [
    "DenseRouter",
    "ExpertBank",
    "ExpertChoiceRouter",
    "FeedForward",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "NoisyTopKRouter",
    "ParameterCounts",
    "Permutation",
    "Routing",
    "TopKRouter",
    "apply_capacity",
    "expert_capacity",
]
__version__ = "0.2.0"
