"""The paper table and the figures, from result rows written as real Parquet files."""

import io
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from orchestrator import plots
from orchestrator.results import ResultsError, read_results, write_row
from orchestrator.storage import Storage
from orchestrator.tables import paper_table, render, select

REPO = Path(__file__).resolve().parents[1]
# (attack, defense) -> per seed (acc_after, asr_after, ra_after, der); the backdoored model per (attack, seed).
AFTER = {
    ("badnets", "sau"): [(0.90, 0.02, 0.85, 0.96), (0.92, 0.04, 0.83, 0.95), (0.91, 0.03, 0.84, 0.97)],
    ("badnets", "ft"): [(0.94, 0.60, 0.30, 0.70), (0.93, 0.50, 0.35, 0.74), (0.95, 0.70, 0.25, 0.66)],
    ("blended", "sau"): [(0.80, 0.10, 0.60, 0.90), (0.82, 0.12, 0.58, 0.89)],
    ("blended", "ft"): [(0.85, 0.05, 0.70, 0.93), (0.84, 0.09, 0.66, 0.92)],
}
BEFORE = {"badnets": [(0.95, 1.00), (0.96, 0.99), (0.97, 1.00)], "blended": [(0.90, 0.98), (0.91, 1.00)]}


def row(n, attack, defense, seed, after, code_version="1", status="finished", **extra):
    acc_b, asr_b = BEFORE[attack][seed]
    acc, asr, ra, der = after
    params = {"clean_ratio": 0.05, f"{defense}.lr": 1e-4} if defense != "none" else {}
    return {"trial_id": f"{n:016x}", "grid": "g", "dataset": "digits", "attack": attack, "arch": "cnn-small",
            "seed": seed, "defense": defense, **params, "acc_before": acc_b, "asr_before": asr_b, "ra_before": 0.0,
            "acc_after": acc, "asr_after": asr, "ra_after": ra, "der": der, "rounds_done": 10, "status": status,
            "code_version": code_version, "mlflow_run_id": None, **extra}


@pytest.fixture
def storage(tmp_path):
    n = 0
    for (attack, defense), per_seed in AFTER.items():
        for seed, after in enumerate(per_seed):
            write_row(tmp_path / "results", row(n := n + 1, attack, defense, seed, after))
    for attack, models in BEFORE.items():
        for seed, (acc, asr) in enumerate(models):  # none: the model as it is
            write_row(tmp_path / "results", row(n := n + 1, attack, "none", seed, (acc, asr, 0.0, 0.5)))
    write_row(tmp_path / "results", row(n + 1, "badnets", "sau", 0, (0.1, 0.0, 0.1, 0.6), status="stopped"))
    return tmp_path


def test_paper_table_means_stds_counts_and_best_in_bold(storage):
    df = read_results(storage)
    table = paper_table(select(df, {}))
    assert table.keys == ["dataset", "arch", "attack"] and table.defenses == ["sau", "ft"]
    badnets, blended = table.rows
    sau = badnets["sau"]
    assert sau["acc"].n == 3  # the stopped row is left out
    assert sau["acc"].mean == pytest.approx(statistics.mean([0.90, 0.92, 0.91]))
    assert sau["acc"].std == pytest.approx(statistics.stdev([0.90, 0.92, 0.91]))
    assert badnets["no_defense"]["asr"].mean == pytest.approx(statistics.mean([1.00, 0.99, 1.00]))
    assert blended["ft"]["der"].n == 2 and blended["no_defense"]["acc"].n == 2

    md = render(table, "md").splitlines()
    assert md[0] == ("| dataset | arch | attack | No defense ACC | No defense ASR | sau ACC | sau ASR | sau RA | "
                     "sau DER | sau n | ft ACC | ft ASR | ft RA | ft DER | ft n |")
    cells = md[2].split(" | ")
    assert cells[3] == "96.00 ± 1.00" and cells[5] == "91.00 ± 1.00"  # no-defense ACC; sau ACC not the best
    assert cells[6] == "**3.00 ± 1.00**" and cells[10] == "**94.00 ± 1.00**"  # sau ASR, ft ACC: best of the row
    assert cells[9] == "3" and cells[14] == "3 |"
    blended_cells = md[3].split(" | ")
    assert blended_cells[11] == "**7.00 ± 2.83**"  # blended: ft's ASR is the lower

    latex = render(table, "latex")
    assert r"\textbf{3.00 $\pm$ 1.00}" in latex and latex.startswith(r"\begin{tabular}{lll")
    back = pd.read_csv(io.StringIO(render(table, "csv")))
    assert back.loc[0, "sau.acc"] == pytest.approx(0.91) and back.loc[0, "sau.acc_n"] == 3
    assert back.loc[1, "ft.asr_std"] == pytest.approx(statistics.stdev([0.05, 0.09]))


def test_paper_table_where_group_by_and_code_versions(storage):
    df = read_results(storage)
    write_row(storage / "results", row(99, "badnets", "sau", 1, (0.5, 0.5, 0.5, 0.5), code_version="2"))
    df = read_results(storage)
    table = paper_table(select(df, {}))
    assert "code_version" in table.keys  # never averaged together: a row per code version
    rows = {(r["attack"], r["code_version"]): r for r in table.rows}
    assert rows[("badnets", "2")]["sau"]["acc"].n == 1 and rows[("badnets", "1")]["sau"]["acc"].n == 3
    assert rows[("badnets", "2")]["ft"] is None
    assert len(select(df, {"attack": "blended"})) == 6
    assert len(select(df, {"clean_ratio": 0.05})) == len(select(df, {}))  # none rows have no clean_ratio
    assert len(select(df, {"clean_ratio": 0.1})) == 5  # only the none rows
    with pytest.raises(ResultsError, match="--where nope: no such column"):
        select(df, {"nope": 1})
    grouped = paper_table(select(df, {"code_version": "1"}), group_by=["seed"])
    assert len(grouped.rows) == 5 and {r["sau"]["acc"].n for r in grouped.rows if r["sau"]} == {1}


def test_report_command_paper_table_and_warning(storage):
    write_row(storage / "results", row(99, "badnets", "sau", 1, (0.5, 0.5, 0.5, 0.5), code_version="2"))
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", str(storage), "--table", "paper",
                             "--where", "attack=blended"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 3 and "| digits | cnn-small | blended |" in result.stdout
    assert result.stderr.startswith(f"warning: {storage} holds rows of code versions 1, 2;")
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", str(storage), "--format", "latex"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --format latex")


def decoded(path: Path, size: tuple[int, int]) -> None:
    """The figure exists and decodes as an image of `size` pixels (PNG) or as SVG of that size in points."""
    assert path.stat().st_size > 0
    if path.suffix == ".png":
        with Image.open(path) as image:
            image.load()
            assert image.size == size
    else:
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg")
        assert (float(root.get("width").removesuffix("pt")), float(root.get("height").removesuffix("pt"))) == \
            (size[0] * 72 / plots.DPI, size[1] * 72 / plots.DPI)


def test_figures_decode_at_their_size(storage, tmp_path):
    rows = []
    for n, (attack, seed, eps) in enumerate((a, s, e) for a in ("badnets", "blended") for s in (0, 1)
                                            for e in (0.1, 0.2, 0.3)):
        rows.append(row(n, attack, "sau", seed, (0.9 - eps / 3, 0.5 - eps - seed / 20, 0.6, 0.8), **{"sau.eps": eps}))
    df = pd.DataFrame(rows)
    out = Storage(tmp_path / "figures")
    paths = [Path(p) for p in plots.against(df, "eps", ["asr_after", "acc_after"], out)]
    assert paths == [tmp_path / "figures" / name for name in ("eps-asr_after-acc_after.png",
                                                               "eps-asr_after-acc_after.svg")]
    for path in paths:
        decoded(path, (1280, 400))
    for path in plots.pareto(df, [("acc_after", "max"), ("asr_after", "min")], out):
        decoded(Path(path), (640, 400))
    with pytest.raises(ResultsError, match="--x lmd_sar: no such column"):
        plots.against(df, "lmd_sar", ["asr_after"], out)


def test_plot_command_writes_the_figures_it_names(storage, tmp_path):
    out = tmp_path / "figures"
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plot", str(storage), "--x", "clean_ratio",
                             "--pareto", "acc_after:max,asr_after:min", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert sorted(p.name for p in paths) == ["clean_ratio-asr_after-acc_after.png",
                                             "clean_ratio-asr_after-acc_after.svg", "pareto.png", "pareto.svg"]
    decoded(out / "clean_ratio-asr_after-acc_after.png", (1280, 400))
    decoded(out / "pareto.svg", (640, 400))
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plot", str(storage), "--trials",
                          "00000000", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --trials: {storage / 'sweep.json'} is absent; give --tracking-uri"]
    assert not list(out.glob("rounds-*"))
