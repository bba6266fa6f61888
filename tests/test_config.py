"""List-valued options: typed tuple fields, parsed in one place for the command line, JSON and Python."""

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from selfablate.circuits.run import CircuitConfig
from selfablate.cli import build, main, make_parser
from selfablate.config import check_lists, config_from_dict, list_item_type, parse_list
from selfablate.errors import ConfigError
from selfablate.reproduce import ReproduceConfig


@dataclass(frozen=True)
class Lists:
    ints: tuple[int, ...] = (1, 2)
    floats: tuple[float, ...] = ()
    names: tuple[Literal["a", "b"], ...] = ("a",)

    def __post_init__(self) -> None:
        check_lists(self)


def test_item_types_and_parsing():
    assert list_item_type(tuple[int, ...]) is int and list_item_type(tuple[int, int]) is None
    assert list_item_type(int) is None and list_item_type(Literal["a"]) is None
    assert parse_list(int, "2, 8,") == (2, 8) and parse_list(float, "") == ()
    assert parse_list(float, "0.003,1e-2") == (0.003, 0.01)
    assert parse_list(Literal["a", "b"], "a,b") == ("a", "b")
    with pytest.raises(ValueError, match="comma-separated int values, got '2,x'"):
        parse_list(int, "2,x")


def test_lists_from_python_become_tuples_of_the_item_type():
    cfg = Lists(ints=[3, 4], floats=[1, 2.5])
    assert cfg.ints == (3, 4) and cfg.floats == (1.0, 2.5) and isinstance(cfg.floats[0], float)
    assert hash(cfg) == hash(Lists(ints=(3, 4), floats=(1.0, 2.5)))  # frozen and hashable, as a tuple is


@pytest.mark.parametrize("bad, msg", [
    (dict(ints="1,2"), "ints must be a list, got '1,2'"),
    (dict(ints=(1, 2.5)), "every item of ints must be of type int; got 2.5"),
    (dict(ints=(True,)), "every item of ints must be of type int; got True"),
    (dict(floats=(1.0, float("inf"))), "every item of floats must be a finite number; got inf"),
    (dict(floats=("1",)), "every item of floats must be a finite number; got '1'"),
    (dict(names=("a", "c")), "every item of names must be one of a, b; got 'c'"),
])
def test_a_wrong_item_is_a_one_line_config_error(bad, msg):
    with pytest.raises(ConfigError) as e:
        Lists(**bad)
    assert str(e.value) == msg


def test_json_arrays_round_trip():
    cfg = ReproduceConfig(ks=(2, 8), ablations=("global",), tau_sweep=(0.01,))
    again = config_from_dict(ReproduceConfig, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and again.ks == (2, 8)


def test_the_command_line_gives_typed_lists():
    parser = make_parser()
    cfg = build(ReproduceConfig, parser.parse_args(["reproduce", "--ks", "2,8", "--ablations", "local",
                                                    "--seeds", "0,1", "--tau-sweep", "0.01,0.1", "--sae-sweep", ""]))
    assert (cfg.ks, cfg.ablations, cfg.seeds, cfg.tau_sweep, cfg.sae_sweep) == ((2, 8), ("local",), (0, 1),
                                                                               (0.01, 0.1), ())
    assert build(CircuitConfig, parser.parse_args(["circuits", "x", "--sweep", "0.001"])).sweep == (0.001,)
    assert parser.parse_args(["sae", "sweep", "x"]).values == (1.0, 2.0, 5.0, 10.0)  # the default, parsed
    assert parser.parse_args(["sae", "sweep", "x", "--values", "3,4"]).values == (3.0, 4.0)


@pytest.mark.parametrize("argv, msg", [
    (["reproduce", "--ks", "2,x"], "argument --ks: expected comma-separated int values, got '2,x'"),
    (["reproduce", "--ablations", "local,nope"], "every item of ablations must be one of local, global, both"),
    (["reproduce", "--ks", "0"], "every k must be >= 1"),
    (["circuits", "x", "--sweep", "0.1,-1"], "every tau of sweep must be >= 0"),
    (["sae", "sweep", "x", "--values", "1,y"], "argument --values: expected comma-separated float values"),
])
def test_bad_lists_on_the_command_line_exit_2_with_the_reason(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        code = main([*argv, "--out", str(tmp_path / "out")])
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and msg in err and "Traceback" not in err, err
