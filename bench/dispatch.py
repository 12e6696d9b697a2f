"""Command-line wrapper of ``python -m moe_lib.bench.dispatch`` (same options; see its --help)."""

from moe_lib.bench.dispatch import main

if __name__ == "__main__":
    main()
