"""Benchmarks and experiments of the book, as importable modules with a command line each.

Nothing in the core of moe_lib imports this package; it uses the core, the standard library,
torch and numpy (and, for the language-model experiment, the training loop's pandas and tqdm).
It draws nothing.

- :mod:`moe_lib.bench.dispatch`: MoE layers against the dense FFN with the same active FLOPs:
  time, memory and TFLOP/s side by side (``python -m moe_lib.bench.dispatch [--quick]``; chapter
  6). Built from:

  - :mod:`moe_lib.bench.impls`: the implementations under test, a registry filled by
    ``@register(name)``;
  - :mod:`moe_lib.bench.baselines`: the slow reference loops (mask loop, Hugging Face's
    index_add loop, a ``torch._grouped_mm`` expert bank);
  - :mod:`moe_lib.bench.timing`: interleaved rounds, medians, clocks, exact peak memory;
  - :mod:`moe_lib.bench.stages`: the forward time of the sorted dispatch stage by stage;
  - :mod:`moe_lib.bench.graph_breaks`: where ``torch.compile`` breaks the sorted dispatch;
  - :mod:`moe_lib.bench.machine`: the machine a result came from, in words.

- :mod:`moe_lib.bench.moe_vs_dense`: an MoE language model against dense models with its active
  and its total parameters (``python -m moe_lib.bench.moe_vs_dense --quick``; chapter 8).
- :mod:`moe_lib.bench.results`: stored results of long runs, ``results.load(name) -> dict``.

``python -m moe_lib.bench.<module> --help`` lists each command line's options.
"""

from moe_lib.bench import results

__all__ = ["results"]
