"""Reports and notebooks: every notebook executes (nbclient) against a small store made here,
and the report files have the expected columns and figures."""

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from study.export import export_model
from study.report import IMAGE_FIGURES, write_report
from study.runner import run_study
from tests.conftest import TINY, write_fake_dataset

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
IMAGE_SETTINGS = {"validation_size": 100, "min_epochs": 2, "max_epochs": 3}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with tiny runs of all four studies, a results directory with one export, and
    the tiny image dataset as the default data directory."""
    tmp = tmp_path_factory.mktemp("store")
    storage = f"sqlite:///{tmp / 'store.db'}"
    images = write_fake_dataset(tmp / "data", train=400, test=100)
    common = dict(storage=storage, sampler_seed=0, device="cpu", quiet=True)
    run_study("boolean-shallow", trials=4, settings=TINY, population=4, **common)
    run_study("boolean-deep", trials=4, settings=TINY, population=4, **common)
    for name in ("fashion-mlp", "fashion-cnn"):
        # the median pruner (not the default): the report's fidelity lines need pruned trials
        run_study(name, trials=6, settings=IMAGE_SETTINGS, data_dir=str(images), pruner="median",
                  **common)  # fmt: skip
    results = tmp / "results"
    export_model(
        "fashion-mlp", storage, results / "fashion-mlp", "cpu", images, log=lambda *_: None
    )
    return storage, results, images


@pytest.mark.slow
@pytest.mark.parametrize("name", ["boolean-shallow", "boolean-deep"])
def test_boolean_report_files(store, tmp_path, name):
    storage, _, _ = store
    out = write_report(name, storage, tmp_path / name)
    frame = pd.read_csv(out / "trials.csv")
    for column in ["number", "state", "value", "duration_seconds", "neurons", "parameters",
                   "success_share", "median_best_loss", "constraint_learns_f"]:  # fmt: skip
        assert column in frame, column
    assert len(frame) >= 4
    for png in ["neurons_vs_loss.png", "success_share_vs_width.png", "best_width_history.png"]:
        assert (out / png).stat().st_size > 10_000, png
    assert "## Answer" in (out / "summary.md").read_text()


@pytest.mark.parametrize("name", ["fashion-mlp", "fashion-cnn"])
def test_image_report_files(store, tmp_path, name):
    storage, results, _ = store
    out = write_report(name, storage, tmp_path / name)
    frame = pd.read_csv(out / "trials.csv")
    expected = ["number", "state", "value", "duration_seconds", "param_optimizer",
                "param_batch_size", "param_lr_schedule", "steps_reported", "learning_rate",
                "parameters", "device", "seconds_per_epoch", "peak_memory_bytes", "history",
                "config"]  # fmt: skip
    for column in expected:
        assert column in frame, column
    assert len(frame) == 6
    # the fidelity each trial reached: a pruned trial stopped before the complete ones
    steps = frame.groupby("state")["steps_reported"].max()
    assert steps["PRUNED"] < frame.loc[frame.state == "COMPLETE", "steps_reported"].min()
    for png, _ in IMAGE_FIGURES:
        assert (out / png).stat().st_size > 10_000, png
    summary = (out / "summary.md").read_text()
    assert "**Validation accuracy" in summary and "6 in total" in summary
    # an export in the report's directory puts the test accuracy into the summary
    exported = write_report(name, storage, results / name)
    text = (exported / "summary.md").read_text()
    assert ("**Test accuracy" in text) == (name == "fashion-mlp")


@pytest.mark.slow
@pytest.mark.parametrize(
    "notebook", ["00_foundations.ipynb", "01_boolean_width.ipynb", "02_fashion_mnist.ipynb"]
)
def test_notebook_executes(store, notebook, monkeypatch):
    storage, _, images = store
    monkeypatch.setenv("STUDY_STORAGE", storage)
    monkeypatch.setenv("STUDY_DATA_DIR", str(images))
    book = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    client = NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
    text = "\n".join(
        str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    images_shown = sum(
        "image/png" in output.get("data", {})
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    if notebook.startswith("00"):
        assert "The outputs of the twins are equal" in text
        assert "For p = 0.20, the gradient is   0.4160" in text
        assert "reached the target: True" in text
    elif notebook.startswith("01"):
        assert "boolean-shallow" in text and "boolean-deep" in text
        assert images_shown >= 6
    else:
        assert "fashion-mlp" in text and "fashion-cnn" in text
        assert images_shown >= 2 * len(IMAGE_FIGURES)
        assert 'Predicted: "' in text and 'Actual: "' in text
        # everything from the store it reads: the export of fashion-mlp (its artifacts), and
        # none for fashion-cnn, which was not exported into this store
        assert "fashion-cnn: study 'fashion-cnn' has no exported model in its store" in text


@pytest.mark.parametrize("notebook", ["01_boolean_width.ipynb", "02_fashion_mnist.ipynb"])
def test_a_notebook_shows_no_password_of_its_store(notebook, monkeypatch):
    """The setup cell says which store it reads, without the password in the saved output."""
    monkeypatch.setenv("STUDY_STORAGE", "postgresql://me:hunter2@db.example/studies")
    book = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    setup = next(i for i, c in enumerate(book.cells) if "STUDY_STORAGE" in c.source)
    book.cells = book.cells[: setup + 1]
    NotebookClient(book, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # fmt: skip
    shown = "\n".join(str(o.get("text", "")) for o in book.cells[setup].outputs)
    assert "postgresql://me:***@db.example/studies" in shown and "hunter2" not in shown


def test_notebook_01_on_a_store_of_the_earlier_method_shows_its_answers(monkeypatch):
    """Pointed at the reference store (frontier cells of the earlier method only), notebook 01
    shows their stored widths, as `study best` does, not "no frontier in this store"."""
    store = NOTEBOOKS.parent / "results" / "reference.db"
    monkeypatch.setenv("STUDY_STORAGE", f"sqlite:///{store}")
    book = nbformat.read(NOTEBOOKS / "01_boolean_width.ipynb", as_version=4)
    frontier = next(i for i, c in enumerate(book.cells) if "earlier_frontier_table" in c.source)
    book.cells = book.cells[: frontier + 1]
    NotebookClient(book, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # fmt: skip
    shown = "\n".join(str(o.get("text", "")) + "".join(map(str, o.get("data", {}).values()))
                      for o in book.cells[frontier].outputs)  # fmt: skip
    assert "no frontier in this store" not in shown and "earlier method" in shown
    row = re.search(r"<td>frontier-f0-d1-b2000</td>(.*?)</tr>", shown, re.S).group(1)
    assert "<td>84</td>" in row  # the width `study best` and `optuna best-trial` name


def test_pareto_front_keeps_only_non_dominated_trials():
    from study.report import pareto_front

    front = pareto_front(pd.Series([5, 3, 8, 3, 10]), pd.Series([0.1, 0.5, 0.05, 0.4, 0.2]))
    assert front.values.tolist() == [[3, 0.4], [5, 0.1], [8, 0.05]]


def _committed_text(notebook: str) -> str:
    book = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return "\n".join(
        str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
        + str(output.get("data", {}).get("text/html", ""))
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )  # fmt: skip


@pytest.mark.parametrize(
    "notebook", ["00_foundations.ipynb", "01_boolean_width.ipynb", "02_fashion_mnist.ipynb"]
)
def test_committed_outputs_carry_no_warning_and_no_machine_path(notebook):
    import re

    text = _committed_text(notebook)
    assert "Warning" not in text
    assert not re.search(r"(/tmp/|/home/|/root/|/work/|/usr/)", text), notebook


def test_the_headline_answers_agree_in_readme_notebook_and_answers_json():
    """w_1 and w_2 at the largest budget of function seed 0, as results/answers.json states
    them, are the numbers the README and notebook 01 show."""
    import json

    root = NOTEBOOKS.parent
    document = json.loads((root / "results" / "answers.json").read_text())
    answers = [a for a in document["answers"] if a["function_seed"] == 0]
    budget = max(a["budget_epochs"] for a in answers if a["depth"] == 1)
    w_1 = next(a for a in answers if a["depth"] == 1 and a["budget_epochs"] == budget)
    deep = [a for a in answers if a["depth"] > 1 and a["budget_epochs"] == budget]
    readme = (root / "README.md").read_text()
    notebook = _committed_text("01_boolean_width.ipynb")
    for answer in [w_1, *([min(deep, key=lambda a: a["neurons"])] if deep else [])]:
        rate = f"{answer['confirmation_successes']}/{answer['confirmation_seeds']}"
        assert f"**{answer['neurons']}** (" in readme and rate in readme
        assert str(answer["neurons"]) in notebook and rate in notebook


def test_the_exported_test_accuracy_is_one_labelled_number_everywhere():
    """fashion-cnn's test accuracy, as the reference store holds its export: the mean of its
    training seeds, with the seeds, in the README, its report and notebook 02 alike."""
    import optuna

    from study.studies import EXPORT_ATTR, stored_attrs

    root = NOTEBOOKS.parent
    store = f"sqlite:///{root / 'results' / 'reference.db'}"
    export = stored_attrs(optuna.load_study(study_name="fashion-cnn", storage=store))[EXPORT_ATTR]
    seeds = export["test_accuracy_seeds"]
    mean = f"{sum(seeds) / len(seeds):.4f}"
    listed = ", ".join(f"{a:.4f}" for a in seeds)
    assert len(seeds) == 3
    readme = " ".join((root / "README.md").read_text().split())
    assert f"test accuracy {mean}, the mean of three training seeds** ({listed})" in readme
    report = (root / "results" / "fashion-cnn" / "summary.md").read_text()
    assert f"mean test accuracy **{mean}**" in report and listed in report
    assert f"{mean}, mean of 3 seeds ({listed})" in _committed_text("02_fashion_mnist.ipynb")


def test_figures_keep_points_inside_and_legends_name_only_what_is_there(
    store, tmp_path, monkeypatch
):
    """Success shares stay within [0, 1] after jitter; the timeline's legend lists only the
    states its trials have; every legend sits outside the axes (covers no point)."""
    import optuna

    storage, _, _ = store
    shown = kept_figures(monkeypatch)
    write_report("boolean-shallow", storage, tmp_path / "b")
    write_report("fashion-mlp", storage, tmp_path / "i")
    share = shown["success_share_vs_width.png"].axes[0]
    ys = [y for c in share.collections for _, y in c.get_offsets()]
    assert ys and all(0.0 <= y <= 1.0 for y in ys)
    timeline = shown["timeline.png"].axes[0]
    states = {t.state.name.lower() for t in optuna.load_study(
        study_name="fashion-mlp", storage=storage).trials}  # fmt: skip
    labels = {t.get_text() for t in timeline.get_legend().get_texts()}
    assert {label.split(" ")[0] for label in labels} == states  # "complete (4)", ...
    # every axis of every figure that shows data has readable tick labels, log axes inside
    # one decade included; the importances say on how many trials they rest
    for name, fig in shown.items():
        fig.canvas.draw()
        for ax in fig.axes:
            if ax.has_data() and ax.get_label() != "<colorbar>":
                shares_y = len(ax.get_shared_y_axes().get_siblings(ax)) > 1
                axes = [ax.xaxis] + ([ax.yaxis] if ax is fig.axes[0] or not shares_y else [])
                for axis in axes:  # (a panel sharing the first one's y axis shows no labels)
                    assert [t for t in axis.get_ticklabels() if t.get_text()], (name, axis)
    if "param_importances.png" in shown:
        assert "complete trials" in shown["param_importances.png"].axes[0].get_title()
    for name in ("success_share_vs_width.png", "timeline.png"):
        legend = shown[name].axes[0].get_legend()
        assert legend.get_bbox_to_anchor().x0 >= shown[name].axes[0].get_window_extent().x1 - 1


def test_figures_of_a_one_trial_and_a_one_epoch_study_hold(tmp_path, monkeypatch):
    """A Boolean study of one trial and an image study of one epoch: whole-number ticks for
    neurons, trials and epochs, a one-epoch curve drawn as a point, a note where a panel has
    nothing to show, and links only to figures that were written."""
    shown = kept_figures(monkeypatch)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    images = write_fake_dataset(tmp_path / "data", train=300, test=60)
    common = dict(storage=storage, sampler_seed=0, device="cpu", quiet=True)
    run_study("boolean-shallow", trials=1, settings=TINY, **common)
    run_study("fashion-mlp", trials=1, data_dir=str(images), **common,
              settings={"validation_size": 60, "min_epochs": 1, "max_epochs": 1})  # fmt: skip
    for name in ("boolean-shallow", "fashion-mlp"):
        out = write_report(name, storage, tmp_path / name)
        summary = (out / "summary.md").read_text()
        for link in re.findall(r"\]\(([^)]+\.png)\)", summary):
            assert (out / link).is_file(), link  # no link to a figure not drawn
    for fig in shown.values():
        fig.canvas.draw()  # the tick labels as they are rendered

    def labels(axis) -> list[str]:
        return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]

    def whole(texts: list[str]) -> bool:
        return all(re.fullmatch(r"[−-]?\d+", t) for t in texts)

    history = shown["best_width_history.png"].axes[0]
    assert whole(labels(history.xaxis)) and whole(labels(history.yaxis))
    for ax in shown["neurons_vs_loss.png"].axes[:1] + shown["success_share_vs_width.png"].axes:
        assert whole(labels(ax.xaxis))
    if not any(c.get_offsets().size for c in history.collections):  # nothing learned f
        assert "no trial has learned f yet" in [t.get_text() for t in history.texts]
    curves = shown["learning_curves.png"].axes
    assert all(whole(labels(ax.xaxis)) for ax in curves)
    drawn = [line for line in curves[0].get_lines() if len(line.get_xdata()) == 1]
    assert drawn and all(line.get_marker() not in (None, "None", "") for line in drawn)
    timeline = shown["timeline.png"].axes[0]
    times = labels(timeline.xaxis)
    assert len(times) == len(set(times))  # no repeated time labels
    assert whole(labels(timeline.yaxis))


def kept_figures(monkeypatch) -> dict:
    """The reports' figures by file name, kept open for inspection (they are still saved)."""
    import contextlib

    from study import report_boolean, report_image, tables

    shown: dict = {}

    @contextlib.contextmanager
    def keep(path, *args, **kwargs):
        with tables.figure(path, *args, **kwargs) as (fig, axes):
            shown[Path(path).name] = fig
            yield fig, axes

    monkeypatch.setattr(report_boolean, "figure", keep)
    monkeypatch.setattr(report_image, "figure", keep)
    return shown


def test_the_readmes_method_3_table_is_the_committed_answers_and_recheck():
    """Each method-3 answer in results/frontier3 appears in the README with the seeds that
    stated it and its recheck on the cell's own seeds (population engine)."""
    import json

    root = NOTEBOOKS.parent / "results" / "frontier3"
    answers = json.loads((root / "answers.json").read_text())["answers"]
    rechecks = {e["study"]: e for e in json.loads((root / "recheck.json").read_text())[
        "rechecks"] if e["engine"] == "population"}  # fmt: skip
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| 2,000 |")
            or line.startswith("| 64,000 |")]  # fmt: skip
    assert len(answers) == 4 and len(rows) == 2
    for a in answers:
        (row,) = [r for r in rows if r.startswith(f"| {a['budget_epochs']:,} |")]
        pooled = a["all_heldout"]
        check = rechecks[a["study"]]
        cells = f"**{a['neurons']}**", f"{pooled['heldout_successes']}/{pooled['heldout_seeds']}"
        assert all(c in row for c in cells), (a["study"], row)
        assert f"{check['successes']}/{check['seeds_trained']}" in row
        assert check["holds"] and check["seeds_trained"] >= 96
