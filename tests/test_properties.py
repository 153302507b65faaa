"""Property: for any grid spec and any command line, either a one-line error (exit 2) with nothing written, or
a valid sweep; never a traceback. Grids are random YAML documents and mutations of a valid grid (wrong types,
non-finite and huge numbers, unknown and duplicate keys)."""

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from backdoor import TrainRecipe
from orchestrator import cli
from orchestrator.errors import USER_ERRORS
from orchestrator.spec import MAX_TRIALS, SpecError, expand, load_grid
from orchestrator.sweep import SweepError, _check_against_data

from conftest import TINY_GRID

REPO = Path(__file__).resolve().parents[1]
VALID = {**TINY_GRID, "sau": {**TINY_GRID["sau"], "eps": [0.1, 0.2]},
         "search": None}  # a null search is valid; mutations may give it a body


def bounded(examples: int) -> settings:
    """A fixed number of examples, the same on every run (derandomized); no deadline on a loaded machine."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 2**63, 2**64, 2**70, 1e-9, 0, -1, 0.5, 10**9, "", "digits", "badnets",
                     "cnn-small", "npz:/nonexistent.npz", "max", "tpe"]),
    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6) | st.sampled_from(["name", "low", "high", "choices"]),
                                        inner, max_size=3), max_leaves=6)


def paths(data, at=()) -> list[tuple]:
    """Every path into `data` (dict keys and list indices), the root included."""
    found = [at]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found += paths(value, (*at, key))
    return found


@st.composite
def mutated_grids(draw) -> str:
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(data)))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["set", "delete", "add"]))
        if op == "set" and path:
            parent[path[-1]] = draw(values)
        elif op == "delete" and path:
            del parent[path[-1]]
        else:
            target = parent[path[-1]] if path else data
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=8))] = draw(values)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if draw(st.booleans()) and isinstance(data, dict) and data:
        # A key given twice: PyYAML would silently keep the last.
        key = draw(st.sampled_from(list(data)))
        text += yaml.safe_dump({key: draw(values)}, allow_unicode=True)
    return text


grid_texts = st.one_of(mutated_grids(), values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)), st.text())


def check_grid(text: str) -> str | None:
    """Validate `text` as a grid file; returns the one-line error, or None for a grid that is valid."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(text)
        try:
            grid = load_grid(path)
        except SpecError as error:
            message = str(error)
            assert message.startswith(f"{path}: ") and "\n" not in message, message
            assert sorted(Path(tmp).iterdir()) == [path]
            return message
        assert 1 <= grid.trial_count <= MAX_TRIALS
        if grid.trial_count <= 64:
            specs = expand(grid)
            assert len(specs) == grid.trial_count
            for spec in specs:  # every trial is one its defense and the trainer accept
                spec.config(), TrainRecipe(**spec.training), spec.trial_id
        try:
            _check_against_data(grid)  # what the data decides, still before anything is written
        except (SweepError, *USER_ERRORS) as error:
            assert "\n" not in str(error), str(error)
            return str(error)
        finally:
            assert sorted(Path(tmp).iterdir()) == [path]
        return None


@bounded(200)
@given(grid_texts)
def test_any_grid_is_valid_or_one_line(text):
    check_grid(text)


def test_the_mutations_reach_valid_and_invalid_grids():
    # The property holds trivially if every example fails the same way; this shows both outcomes occur.
    text = yaml.safe_dump(VALID, sort_keys=False)
    assert check_grid(text) is None
    assert check_grid(text + "seeds: [1]\n").endswith(
        f"line {len(text.splitlines()) + 1}, column 1: invalid YAML (duplicate key 'seeds' (first given on line "
        f"{text.splitlines().index('seeds:') + 1}))")


arguments = st.lists(st.sampled_from([
    "--param", "eps=inf", "eps=nan", "eps=1e308", "rounds=1000000000", "pgd_steps=-1", "seed=1180591620717411303424",
    "lr=.inf", "warp=3", "=", "eps", "--clean-ratio", "1e-9", "nan", "-inf", "2", "--seed", "99999999999999999999999",
    "--epochs", "1e9", "--lr", "inf", "--storage", "/proc/self", "--yes", "--resume", "--address", "--debug",
    "--no-such-option", "--dataset", "npz:/nonexistent.npz", "--attack", "badnets", "--arch", "resnet999",
    "--format", "xml", "", "é"]) | st.text(max_size=6), max_size=8)
commands = st.sampled_from([["run", "/nonexistent/grid.yaml"], ["purify", "/nonexistent/model"],
                            ["attack", "--dataset", "npz:/nonexistent.npz", "--attack", "badnets", "--arch",
                             "cnn-small", "--out", "/nonexistent/out"], ["report", "/nonexistent/results"],
                            ["import-backdoorbench", "/nonexistent/record", "--out", "/nonexistent/out"], []])


@bounded(100)
@given(commands, arguments)
def test_any_command_line_is_one_line_and_exit_2(command, extra):
    assume("-h" not in extra and "--help" not in extra)  # help is not an error
    argv = [*command, *extra]
    with tempfile.TemporaryFile("w+") as err:
        stderr, sys.stderr = sys.stderr, err
        try:
            code = cli.main(argv)
        except SystemExit as exit:  # argparse's errors
            code = exit.code
        finally:
            sys.stderr = stderr
        err.seek(0)
        printed = err.read()
    assert code == 2 and len(printed.splitlines()) == 1 and printed.startswith("error: "), (argv, code, printed)


@bounded(4)
@given(mutated_grids())
def test_invalid_grids_through_the_real_command(text):
    assume(check_grid(text) is not None)  # a valid grid would start a sweep
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(text)
        result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--storage",
                                 str(Path(tmp) / "runs")], cwd=tmp, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert sorted(Path(tmp).iterdir()) == [path]


@pytest.mark.parametrize("text", ["a: " + "[" * 3000 + "]" * 3000, "a: &a [*a]", "!!python/object:os.system {}",
                                  "name: x\n" * 2, "\x00", "sau: {eps: 1e999}"])
def test_hostile_documents_are_one_line(text):
    assert check_grid(text) is not None
