"""Record networks: f rebuilt without torch, a search that writes records that verify, resumes,
and agrees with Optuna's best trial; `study verify` refuses what does not hold."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch

from study import record_search, records
from study.cli import main
from study.data import boolean_function
from study.models import build_boolean_net
from study.storage import open_storage

RECIPE = {
    "learning_rate": 0.03,
    "batch_size": 8,
    "lr_schedule": "onecycle",
    "warmup_fraction": 0.05,
    "lr_floor": 0.3,
}


@pytest.mark.parametrize(
    "bits, seed", [((8, 8), 0), ((8, 8), 3), ((4, 3), 2**32 + 5), ((10, 2), 7)]
)
def test_the_truth_table_is_torchs(bits, seed):
    n, m = bits
    fn = boolean_function(n, seed, m)
    inputs, targets = records.truth_table(n, m, seed)
    assert np.array_equal(inputs, fn.inputs.numpy())
    assert np.array_equal(targets, fn.targets.numpy())


def _search(tmp_path, stated, widths, answers=None, below=None):
    answers = answers or [
        {"function_seed": 0, "depth": 1, "budget_epochs": 2000, "neurons": stated,
         "recipe_ranking": [{"recipe": RECIPE}]},
    ]  # fmt: skip
    url = f"sqlite:///{tmp_path / 'records.db'}"
    lines: list[str] = []
    found = record_search.search(
        url, open_storage(url, create=True), [(0, 1)], 2000, answers, 4, 1, 1,
        tmp_path / "records", "study records run (test)", lines.append, widths, below,
    )  # fmt: skip
    return url, found, lines


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(record_search, "RECORD_BLOCK", 4)


def test_a_search_keeps_a_record_that_verifies_and_resumes(tmp_path, small_blocks, capsys):
    url, found, lines = _search(tmp_path, stated=81, widths=1)
    path = found[(0, 1)]
    assert path == tmp_path / "records" / "f0-d1-80.json"
    meta = json.loads(path.read_text())
    assert meta["hidden_layer_profile"] == [80] and meta["function_seed"] == 0
    assert meta["recipe"] == RECIPE and meta["budget_epochs"] == 2000
    assert meta["epochs_run"] <= 2000 and meta["final_loss"] <= 0.001
    assert meta["init_seed"] in record_search.seeds_of("records-f0-d1-b2000", 80, 0, 0)
    check = records.verify(path)
    assert check.holds and check.wrong_bits == 0 and check.loss <= 0.001

    # the weights load into the tool's own network, which gets every bit right in torch too
    net = build_boolean_net((80,), 8, 8, 0)
    net.load_state_dict(load_torch(path.with_suffix(".safetensors")))
    fn = boolean_function(8, 0, 8)
    with torch.no_grad():
        logits = net(fn.inputs)
    assert torch.equal((logits > 0).float(), fn.targets)

    # Optuna's best trial of the records study is the record's width
    study = optuna.load_study(study_name="records-f0-d1-b2000", storage=url)
    assert study.best_trial.params["neurons"] == 80

    # resumed: nothing trained again, the record kept
    trials = len(study.trials)
    before = path.read_text()
    _, again, lines = _search(tmp_path, stated=81, widths=1)
    assert again[(0, 1)] == path and path.read_text() == before
    assert not any("training" in line for line in lines)
    assert len(optuna.load_study(study_name="records-f0-d1-b2000", storage=url).trials) == trials

    assert main(["verify", str(path)]) == 0
    assert "holds: hidden 80 (80 neurons)" in capsys.readouterr().out


def test_a_width_whose_seeds_all_fail_ends_the_search(tmp_path, small_blocks):
    _, found, lines = _search(tmp_path, stated=81, widths=2, below=3)  # starts below 3
    assert found[(0, 1)] is None
    assert any("2 neurons, block 0: learned [0]" in line for line in lines)
    assert not any("1 neurons" in line for line in lines)  # it stopped at the failing width
    assert not (tmp_path / "records").exists()


def _record(tmp_path):
    """A record written by hand from a network that learns nothing (it must fail)."""
    net = build_boolean_net((5,), 8, 8, 1)
    tensors = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    meta = {"kind": "boolean-record", "hidden_layer_profile": [5], "neurons": 5,
            "function_seed": 0, "input_bits": 8, "output_bits": 8, "target_loss": 0.001,
            "epochs_run": 0}  # fmt: skip
    return records.write(tmp_path, tensors, meta)


def test_verify_refuses_a_network_that_does_not_learn_f(tmp_path, capsys):
    path = _record(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["verify", str(path)])
    assert stop.value.code == 1
    assert "FAILS" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["missing", "not-a-record", "shape", "names", "garbled"])
def test_a_damaged_record_is_one_line(tmp_path, capsys, damage):
    path = _record(tmp_path)
    weights = path.with_suffix(".safetensors")
    if damage == "missing":
        weights.unlink()
    elif damage == "not-a-record":
        path.write_text(json.dumps({"kind": "something else"}))
    elif damage == "shape":
        tensors = load_file(weights)
        tensors["layers.0.weight"] = np.zeros((6, 8), np.float32)
        save_file(tensors, weights)
    elif damage == "names":
        tensors = load_file(weights)
        tensors["extra"] = tensors.pop("output_layer.bias")
        save_file(tensors, weights)
    else:
        weights.write_bytes(b"\x00" * 20)
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("study: error: ") and len(err.splitlines()) == 1


def test_seed_ranges_are_disjoint_from_the_frontiers():
    from study.answers import SELECTION_SEED

    seeds = set()
    for name in ("records-f0-d1-b64000", "records-f0-d2-b64000", "records-f1-d1-b64000"):
        for neurons in (1, 44, 512):
            for rank in (0, 1):
                for block in (0, 3):
                    block_seeds = set(record_search.seeds_of(name, neurons, rank, block))
                    assert not seeds & block_seeds
                    seeds |= block_seeds
    assert min(seeds) > SELECTION_SEED * 1000 and max(seeds) < 2**63


def test_verify_is_quick_and_imports_no_torch(tmp_path):
    path = _record(tmp_path)
    script = (
        "import sys; from study.cli import main\n"
        "try: main(sys.argv[1:])\n"
        "except SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "verify", str(path)], capture_output=True, text=True
    ).stdout
    assert out.strip().endswith("False")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the pruning takes (threads only cost nets this small); the
    suite's other tests get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def learned_record(directory, neurons=8, bits=(4, 3)):
    """A record of f ({0,1}^4 -> {0,1}^3, seed 0 by default) trained here until every bit is
    right with full-table Adam."""
    n, m = bits
    fn = boolean_function(n, 0, m)
    net = build_boolean_net((neurons,), n, m, 0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    epoch, loss = 0, torch.tensor(1.0)
    while loss.item() >= 5e-4 and epoch < 5000:  # one thread: see the fixture below
        epoch += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(fn.inputs), fn.targets)
        loss.backward()
        optimizer.step()
    tensors = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    meta = {"kind": "boolean-record", "hidden_layer_profile": [neurons], "neurons": neurons,
            "function_seed": 0, "input_bits": n, "output_bits": m, "target_loss": 0.001,
            "final_loss": loss.item(), "epochs_run": epoch, "budget_epochs": 5000,
            "init_seed": 0, "method": records.PLAIN}  # fmt: skip
    path = records.write(directory, tensors, meta)
    assert records.verify(path).holds
    return path


def test_pruning_writes_smaller_records_that_verify_and_stops_at_the_first_failure(tmp_path):
    start = learned_record(tmp_path)
    lines = []
    smallest = record_search.prune(start, tmp_path, 1000, 0.01, "study records prune (test)",
                                   lines.append)  # fmt: skip
    written = sorted(tmp_path.glob("*-pruned.json"))
    assert smallest is not None and smallest in written
    sizes = sorted(json.loads(p.read_text())["neurons"] for p in written)
    assert sizes == list(range(sizes[0], 8))  # one neuron at a time, none skipped
    for path in written:
        meta = json.loads(path.read_text())
        assert meta["method"] == record_search.PRUNED and meta["pruned_from"] == str(start)
        assert records.verify(path).holds
    assert lines[-1].endswith("pruning ends") or sizes[0] == 1
    # both methods are listed, each its smallest
    best = records.smallest(tmp_path)
    assert best[(0, 1, records.PLAIN)]["neurons"] == 8
    assert best[(0, 1, record_search.PRUNED)]["neurons"] == sizes[0]


def test_removing_a_neuron_keeps_the_rest_of_the_network(tmp_path):
    _, layers = record_search._layers_of(learned_record(tmp_path, neurons=8))
    fn = boolean_function(4, 0, 3)
    before = [[t.clone() for t in layer] for layer in layers]
    layer, neuron = record_search.remove_weakest(layers, fn.inputs)
    assert layer == 0 and layers[0][0].shape == (7, 4) and layers[1][0].shape == (3, 7)
    keep = [k for k in range(8) if k != neuron]
    assert torch.equal(layers[0][0], before[0][0][keep])
    assert torch.equal(layers[1][0], before[1][0][:, keep])


def test_records_prune_command(tmp_path, capsys):
    learned_record(tmp_path)
    code = main(["records", "prune", "--out", str(tmp_path), "--epochs", "500",
                 "--learning-rate", "0.01", "--quiet"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "f0-d1-8.json: pruned to" in out
    assert main(["records", "prune", str(tmp_path / "nope.json")]) == 2
    assert "not a readable record" in capsys.readouterr().err


def test_the_committed_records_verify_and_the_readme_states_the_smallest():
    """Every record in results/records holds (`study verify`), and the README's record
    sentence names the smallest plain record of each depth of function seed 0."""
    from pathlib import Path

    root = Path(__file__).parent.parent
    directory = root / "results" / "records"
    paths = sorted(directory.glob("*.json"))
    assert paths, "no committed record"
    for path in paths:
        assert records.verify(path).holds, path
    readme = " ".join((root / "README.md").read_text().split())
    best = records.smallest(directory)
    for depth, name in ((1, "w_1"), (2, "w_2")):
        record = best[(0, depth, records.PLAIN)]
        profile = "-".join(map(str, record["hidden_layer_profile"]))
        stated = f"{name} record = {record['neurons']} ({profile}) at {record['budget_epochs']:,}"
        assert stated in readme, stated
        assert Path(record["file"]).name in readme
    for depth in (3, 4):  # the deeper records, where searched
        record = best.get((0, depth, records.PLAIN))
        if record is not None:
            profile = "-".join(map(str, record["hidden_layer_profile"]))
            assert f"{record['neurons']} ({profile})" in readme, (depth, profile)
