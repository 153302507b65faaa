"""Defenses as a grid axis: the registry, `none` once per model, `ft` with SAU's budget, a defense plugged in by
the registry alone, and the trial-id rule (docs/design.md, "Trial identity")."""

import copy
from dataclasses import dataclass, field, fields, make_dataclass

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from backdoor import CODE_VERSION, build_model, clean_subset, to_unit
from defenses import DEFENSES, SAU, Defense, FTConfig
from defenses.ft import fine_tune
from orchestrator import spec as spec_module
from orchestrator.spec import SpecError, expand, load_grid
from orchestrator.storage import Storage
from orchestrator.store import train_model
from orchestrator.trial import run_trial, write_stopped_row
from sau_kernel import SAUConfig, purify

from conftest import TINY_GRID


def grid(tmp_path, **fields):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY_GRID, **fields}, sort_keys=False))
    return load_grid(path)


def test_none_is_one_trial_per_model_whatever_the_other_axes(tmp_path):
    trials = expand(grid(tmp_path, seeds=[0, 1], eval_every=2, defenses=["none", "sau", {"name": "ft", "lr": 0.01}],
                         sau={"eps": [0.1, 0.2], "clean_ratio": [0.1, 0.2], "lr": 0.001, "rounds": 3}))
    by_defense = {d: [t for t in trials if t.defense == d] for d in ("none", "sau", "ft")}
    assert len(by_defense["none"]) == 2  # one per backdoored model (two seeds)
    assert len(by_defense["sau"]) == 2 * 2 * 2 and len(by_defense["ft"]) == 2 * 2  # ft: no eps, but clean_ratio
    assert {t.model_key for t in by_defense["none"]} == {t.model_key for t in trials}
    none = by_defense["none"][0]
    assert none.clean_ratio is None and none.params == {} and "clean_ratio" not in none.flat()
    # Its id does not depend on the defense settings or the evaluation cadence of the grid.
    other = expand(grid(tmp_path, seeds=[0, 1], eval_every=5, defenses=["none"], sau={"clean_ratio": 0.5}))
    assert [t.trial_id for t in other] == [t.trial_id for t in by_defense["none"]]
    # ft inherits SAU's budget from the sau: section, its own entry overrides it.
    ft = by_defense["ft"][0]
    assert ft.config() == FTConfig(lr=0.01, rounds=3, batch_size=256, train_bn=False, seed=0)
    assert ft.flat()["defense"] == "ft" and ft.flat()["ft.lr"] == 0.01 and "sau.eps" not in ft.flat()
    assert len({t.trial_id for t in trials}) == len(trials)


@pytest.mark.parametrize("defenses, message", [
    (["pruning"], "defenses[0].name: unknown defense 'pruning' (known: sau, none, ft)"),
    ([{"name": "none", "lr": 0.1}], "defenses[0].lr: none takes no parameters"),
    ([{"name": "ft", "eps": 0.1}],
     "defenses[0].eps: unknown FT field (known: lr, rounds, batch_size, train_bn, clean_ratio; seed comes from seeds)"),
    ([{"name": "ft", "lr": [0.1, 0.1]}], "defenses[0].lr[1]: same as item 0"),
    (["sau", "sau"], "defenses[1]: same as item 0"),
])
def test_bad_defenses_give_one_line(tmp_path, defenses, message):
    with pytest.raises(SpecError) as info:
        grid(tmp_path, defenses=defenses)
    assert str(info.value) == f"{tmp_path / 'grid.yaml'}: {message}", str(info.value)


def test_a_search_runs_on_one_defense(tmp_path):
    search = {"num_samples": 2, "space": {"lr": {"low": 0.001, "high": 0.1, "log": True}},
              "objectives": [{"metric": "der", "mode": "max"}]}
    (base,) = expand(grid(tmp_path, defenses=["ft"], search=search))
    assert base.defense == "ft" and base.with_params(lr=0.05).config().lr == 0.05
    with pytest.raises(SpecError, match="search: runs on one defense; defenses has 2"):
        grid(tmp_path, defenses=["ft", "sau"], search=search)
    with pytest.raises(SpecError, match=r"search.space.eps: unknown FT field"):
        grid(tmp_path, defenses=["ft"], search={**search, "space": {"eps": {"low": 0.1, "high": 0.3}}})
    with pytest.raises(SpecError, match=r"search.scheduler.grace_rounds: must be a multiple of eval_every \(2\)"):
        grid(tmp_path, search={**search, "scheduler": {"name": "asha", "grace_rounds": 1}})


def test_mode_at_its_default_keeps_every_trial_id(tmp_path, monkeypatch):
    """SAUConfig gained `mode: str = "reference"` after trial ids were defined: it must not orphan earlier rows."""
    sau = {"eps": [0.1, 0.2], "clean_ratio": 0.2, "lr": 0.001, "rounds": 3}
    without_mode = make_dataclass("SAUConfig", [(f.name, f.type, field(default=f.default)) for f in fields(SAUConfig)
                                                if f.name != "mode"], frozen=True)
    with monkeypatch.context() as patch:
        patch.setattr(SAU, "params_type", without_mode)
        before = [t.trial_id for t in expand(grid(tmp_path, sau=sau))]
    assert "mode" not in SAU.id_fields
    trials = expand(grid(tmp_path, sau=sau))
    assert trials[0].config().mode == "reference" and trials[0].flat()["sau.mode"] == "reference"
    assert [t.trial_id for t in trials] == before
    assert [t.trial_id for t in expand(grid(tmp_path, sau={**sau, "mode": "reference"}))] == before
    fast = [t.trial_id for t in expand(grid(tmp_path, sau={**sau, "mode": "fast"}))]
    assert len(set(fast) | set(before)) == 4  # a value off the default is a different trial


def test_a_new_code_version_changes_trial_ids_and_model_keys(tmp_path, monkeypatch):
    (trial,) = expand(grid(tmp_path))
    first = trial.trial_id, trial.model_key
    monkeypatch.setattr(spec_module, "CODE_VERSION", f"{spec_module.CODE_VERSION}-next")
    assert trial.trial_id != first[0] and trial.model_key != first[1]


@dataclass(frozen=True)
class ShrinkParams:
    factor: float = 0.5
    seed: int = 0


class Shrink(Defense):
    """A toy defense: scales the last layer's weights once; one round."""
    name = "shrink"
    params_type = ShrinkParams
    id_fields = frozenset({"factor", "seed"})

    @staticmethod
    def purify(model, x_clean, y_clean, config, *, device, on_round=None, resume=None):
        return purify(model, x_clean, y_clean, SAUConfig(rounds=1, lr=config.factor * 1e-3, seed=config.seed),
                      device=device, on_round=on_round, resume=resume)


def test_a_defense_plugged_in_by_the_registry_alone_runs_as_a_trial(tmp_path, monkeypatch):
    monkeypatch.setitem(DEFENSES, "shrink", Shrink)
    trials = expand(grid(tmp_path, defenses=["none", {"name": "shrink", "factor": [0.5, 2.0]}], eval_every=1))
    none, half, double = trials
    assert half.defense == "shrink" and half.flat()["shrink.factor"] == 0.5 and half.clean_ratio == 0.2
    storage = Storage(tmp_path / "storage")
    train_model(none, storage / "models" / none.model_key)
    rows = [run_trial(t, storage, tracking=None) for t in trials]
    assert [r["defense"] for r in rows] == ["none", "shrink", "shrink"]
    assert [r["rounds_done"] for r in rows] == [0, 1, 1] and {r["status"] for r in rows} == {"finished"}
    assert rows[0]["acc_after"] == rows[0]["acc_before"] and rows[0]["der"] == 0.5  # the model as it is
    assert rows[1]["shrink.factor"] == 0.5 and rows[1]["code_version"] == CODE_VERSION
    assert pq.read_table(tmp_path / "storage" / "results" / f"{half.trial_id}.parquet").to_pylist()[0]["shrink.factor"] == 0.5


def test_ft_spends_sau_budget_and_resumes_exactly(digits):
    index = clean_subset(len(digits.x_train), 0.2, 0)
    x, y = to_unit(digits.x_train[index]), digits.y_train[index]
    torch.manual_seed(0)
    model = build_model("cnn-small", digits.num_classes, digits.shape[0], digits.mean, digits.std)
    initial = copy.deepcopy(model.state_dict())
    cfg = FTConfig(lr=1e-3, rounds=4, batch_size=64, seed=3)
    steps = []
    full = fine_tune(model, x, y, cfg, device=torch.device("cpu"),
                     on_round=lambda p: steps.append(p.optimizer.state_dict()["state"][0]["step"].item()))
    # One Adam step per batch per round, as SAU's: ceil(n / batch_size) a round.
    per_round = -(-len(x) // 64)
    assert steps == [per_round * r for r in range(1, 5)]
    assert [h.round for h in full.history] == [1, 2, 3, 4] and all(h.sar == 0 and h.at == 0 for h in full.history)
    snapshot = {}
    fine_tune(model, x, y, FTConfig(lr=1e-3, rounds=2, batch_size=64, seed=3), device=torch.device("cpu"),
              on_round=lambda p: snapshot.update(p.state_dict()))
    resumed = fine_tune(model, x, y, cfg, device=torch.device("cpu"), resume=snapshot)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(initial.values(), model.state_dict().values()))  # left untouched
    assert not all(torch.equal(a, b) for a, b in zip(initial.values(), full.model.state_dict().values()))


def stop_at_two(metrics):
    if metrics["round"] == 2:
        raise SystemExit(0)  # how Ray Tune ends a function trial it stopped


def test_a_stopped_trial_leaves_a_row_marked_stopped(tmp_path):
    """What a scheduler's stop leaves: the trial ends inside a report, the driver writes the checkpoint's row."""
    (trial,) = expand(grid(tmp_path, eval_every=1, sau={"clean_ratio": 0.2, "lr": 0.001, "rounds": 3}))
    storage = Storage(tmp_path / "storage")
    train_model(trial, storage / "models" / trial.model_key)
    with pytest.raises(SystemExit):
        run_trial(trial, storage, tracking=None, report=stop_at_two)
    row = write_stopped_row(storage, trial.trial_id, tracking=None)
    assert row["status"] == "stopped" and row["rounds_done"] == 2 and row["defense"] == "sau"
    assert write_stopped_row(storage, trial.trial_id, tracking=None) is None  # once
    assert not (tmp_path / "storage" / "checkpoints" / trial.trial_id).exists()
    # Its history is beside the row, as a finished trial's (`sau sync` reads it).
    history = (tmp_path / "storage" / "history" / f"{trial.trial_id}.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history] == ["round", "1", "2"]


def test_ft_resumes_from_its_checkpoint_as_if_never_interrupted(tmp_path):
    (trial,) = expand(grid(tmp_path, defenses=["ft"], sau={"clean_ratio": 0.2, "lr": 0.001, "rounds": 3}))
    storage, whole = Storage(tmp_path / "storage"), Storage(tmp_path / "whole")
    train_model(trial, storage / "models" / trial.model_key)
    train_model(trial, whole / "models" / trial.model_key)
    with pytest.raises(SystemExit):
        run_trial(trial, storage, tracking=None, report=stop_at_two)  # eval_every 2: a checkpoint at round 2
    assert (storage / "checkpoints" / trial.trial_id).names() == ["state-000002.pt"]
    resumed, uninterrupted = run_trial(trial, storage, tracking=None), run_trial(trial, whole, tracking=None)
    assert resumed["status"] == "finished" and resumed["rounds_done"] == 3
    assert {k: resumed[k] for k in ("acc_after", "asr_after", "ra_after")} == \
        {k: uninterrupted[k] for k in ("acc_after", "asr_after", "ra_after")}
    assert not (storage / "checkpoints" / trial.trial_id).exists()
