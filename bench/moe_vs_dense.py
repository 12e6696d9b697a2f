"""Command-line wrapper of ``python -m moe_lib.bench.moe_vs_dense`` (same options; see --help)."""

from moe_lib.bench.moe_vs_dense import main

if __name__ == "__main__":
    main()
