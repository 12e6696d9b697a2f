"""moe_lib.bench.cli: the command line the training experiments share."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest

from moe_lib.bench import cli


@dataclass(frozen=True)
class _Settings:
    steps: int = 10
    width: int = 4
    dtype: str = "float32"
    eval_every: int = 5

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


QUICK, FULL = _Settings(), _Settings(steps=100, width=64)


def test_check_seeds_returns_a_list_and_refuses_bad_seeds():
    assert cli.check_seeds((3, 1)) == [3, 1]
    for seeds, error, word in [(3, TypeError, "seeds"), ([], ValueError, "at least one"),
                               ([1, 1], ValueError, "distinct"), ([-1], ValueError, "seeds"),
                               ([1.5], TypeError, "seeds")]:
        with pytest.raises(error, match=word):
            cli.check_seeds(seeds)


def test_parse_overrides_reads_literals_and_names_the_fields():
    assert cli.parse_overrides(["width=8", "steps=None"], _Settings) == {"width": 8,
                                                                         "steps": None}
    assert cli.parse_overrides(["dtype=bfloat16"], _Settings, strings=True) == {
        "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="number or None"):
        cli.parse_overrides(["dtype=bfloat16"], _Settings)
    with pytest.raises(ValueError, match=r"FIELD one of \['steps', 'width'"):
        cli.parse_overrides(["depth=3"], _Settings)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        cli.parse_overrides(["width"], _Settings)
    with pytest.raises(TypeError, match="items"):
        cli.parse_overrides("width=3", _Settings)
    with pytest.raises(TypeError, match="settings_type"):
        cli.parse_overrides([], dict)


def test_settings_from_args_applies_quick_set_and_steps():
    p = cli.experiment_parser("toy", "a toy", seeds=[0, 1])
    args = p.parse_args(["--quick", "--set", "width=7", "--steps", "3", "--device", "cpu"])
    s, seeds, device = cli.settings_from_args(p, args, QUICK, FULL)
    assert (s, seeds, device.type) == (_Settings(steps=3, width=7), [0, 1], "cpu")
    args = p.parse_args(["--steps", "2"])
    s, _, _ = cli.settings_from_args(
        p, args, QUICK, FULL, with_steps=lambda s, n: replace(s, steps=n, eval_every=n))
    assert (s.steps, s.width, s.eval_every) == (2, 64, 2)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--seeds", "1", "1"], "distinct"),
    (["--threads", "0"], "--threads"),
    (["--set", "depth=2"], "FIELD one of"),
    (["--device", "tpu"], "device"),
])
def test_settings_from_args_ends_with_the_option_named(argv, message, capsys):
    p = cli.experiment_parser("toy", None, seeds=[0])
    with pytest.raises(SystemExit):
        cli.settings_from_args(p, p.parse_args(argv), QUICK, FULL)
    assert message in capsys.readouterr().err


def test_experiment_parser_refuses_bad_defaults():
    with pytest.raises(TypeError, match="module"):
        cli.experiment_parser(3, None, seeds=[0])
    with pytest.raises(ValueError, match="seeds"):
        cli.experiment_parser("toy", None, seeds=[])
    with pytest.raises(ValueError, match="threads"):
        cli.experiment_parser("toy", None, seeds=[0], threads=0)
    assert cli.experiment_parser("toy", None, seeds=[0], threads=None).parse_args([]).threads \
        is None


def test_write_results_records_the_machine_time_and_command(tmp_path):
    out = tmp_path / "r.json"
    clock = cli.Clock()
    cli.write_results(out, "toy", ["--quick"], "cpu", QUICK, clock, [{"seed": 0}], {"a": 1},
                      arms=["x"])
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert data["runs"] == [{"seed": 0}] and data["summary"] == {"a": 1}
    assert meta["settings"] == QUICK.to_dict() and meta["arms"] == ["x"]
    assert meta["command"] == "python -m moe_lib.bench.toy --quick"
    assert meta["seconds"] >= 0 and meta["cpu_seconds"] >= 0 and "device" in meta
    with pytest.raises(TypeError, match="clock"):
        cli.write_results(out, "toy", [], "cpu", QUICK, 0.0, [], {})
    with pytest.raises(TypeError, match="runs"):
        cli.write_results(out, "toy", [], "cpu", QUICK, clock, {}, {})


def test_check_results_names_the_run_and_the_missing_keys():
    assert cli.check_results([{"a": 1, "b": 2}], ("a", "b")) == [{"a": 1, "b": 2}]
    assert cli.check_results([], ("a",)) == []
    with pytest.raises(ValueError, match="at least one"):
        cli.check_results([], ("a",), nonempty=True)
    with pytest.raises(ValueError, match=r"results\[1\] must be a result of run\(\), misses"):
        cli.check_results([{"a": 1, "b": 2}, {"a": 1}], ("a", "b"))
    with pytest.raises(TypeError, match=r"results\[0\]"):
        cli.check_results([3], ("a",))
    with pytest.raises(TypeError, match="results"):
        cli.check_results({}, ("a",))


def test_parse_size_list_reads_tuples_and_names_the_fields():
    import argparse

    assert cli.parse_size_list("1,2,3;4,5,6", "d,h,E") == [(1, 2, 3), (4, 5, 6)]
    for bad in ("1,2", "1,2,x", "1,2,3;", "1,2,3,4"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"a size is d,h,E \(3 ints\)"):
            cli.parse_size_list(bad, "d,h,E")
    with pytest.raises(TypeError, match="fields"):
        cli.parse_size_list("1", 3)
