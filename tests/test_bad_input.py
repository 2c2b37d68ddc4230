"""Every user error is one line on stderr, a non-zero exit, and no change to any store.

Each case runs the real `study` entry point (`study.cli.main`) in this process against a real
SQLite store holding a small Boolean study and an image study record; a few cases that need a
fresh process (signals, imports) live in test_runs.py."""

import hashlib
import os
import pickle
import socket
from pathlib import Path

import optuna
import pytest
import torch

from study.cli import main
from study.config import ImageSettings
from study.runner import run_study
from tests.conftest import TINY, write_fake_dataset, write_idx


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with a tiny Boolean study and an image study record, an export directory, a
    file where a directory is expected, FashionMNIST-like files, a huge PNG."""
    tmp = tmp_path_factory.mktemp("world")
    db = tmp / "store.db"
    storage = f"sqlite:///{db}"
    run_study("boolean-shallow", trials=2, storage=storage, device="cpu", settings=TINY,
              quiet=True, sampler_seed=0)  # fmt: skip
    images = optuna.create_study(storage=storage, study_name="images")
    images.set_user_attr("space", "fashion-mlp")
    images.set_user_attr("kind", "image")
    images.set_user_attr("settings", ImageSettings().identity())
    stuck = optuna.create_study(storage=storage, study_name="stuck", direction="maximize")
    for key in ("space", "kind", "settings"):
        stuck.set_user_attr(key, images.user_attrs[key])
    stuck.ask()  # RUNNING (its process gone)
    stuck.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    (tmp / "a-file").write_text("not a directory")
    os.symlink(tmp / "nowhere", tmp / "dangling")
    # other people's files: another application's SQLite database, an empty file, a pipe
    import sqlite3

    with sqlite3.connect(tmp / "other.db") as other:
        other.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        other.execute("INSERT INTO notes (text) VALUES ('mine')")
    other.close()
    (tmp / "empty.db").write_bytes(b"")
    os.mkfifo(tmp / "fifo.db")
    # an export whose model file is garbage, one whose config is broken, one that is hostile
    for name, model, config in [
        ("garbage", b"\x00not a torch file", None),
        ("badconfig", None, '{"architecture": {"type": "mlp"}, "train": {}}'),
        ("hostile", pickle.dumps(Hostile()), None),
        ("nested", None, "[" * 100_000 + "]" * 100_000),
        ("bigconfig", None, EXPORT_CONFIG + " " * 1_100_000),
        ("hugenet", None, EXPORT_CONFIG.replace("[8]", "[4000000000, 4000000000]")),
    ]:
        d = tmp / name
        d.mkdir()
        (d / "config.json").write_text(config or EXPORT_CONFIG)
        torch.save({}, d / "model.pt")
        if model is not None:
            (d / "model.pt").write_bytes(model)
    # training labels that are FashionMNIST's (first labels and count), asked for as MNIST
    fashion = write_fake_dataset(tmp / "fashion", train=200, test=50)
    labels = torch.zeros(60_000, dtype=torch.uint8)
    labels[:10] = torch.tensor([9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    write_idx(fashion / "train-labels-idx1-ubyte", labels)
    same = write_fake_dataset(tmp / "same", train=200, test=200)
    (same / "t10k-labels-idx1-ubyte").write_bytes((same / "train-labels-idx1-ubyte").read_bytes())
    from PIL import Image

    Image.new("L", (8000, 6000)).save(tmp / "huge.png")
    return tmp, storage


class Hostile:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/study-hostile-marker"),))


EXPORT_CONFIG = (
    '{"architecture": {"type": "mlp", "hidden_layer_profile": [8], "dropout": 0.0}, '
    '"train": {}, "class_names": ["a", "b"], "image_shape": [1, 4, 4], "num_classes": 2, '
    '"pixel_mean": 0.1, "pixel_std": 0.3, "settings": {}}'
)

RUN = ["run", "boolean-shallow", "--storage", "{storage}"]
CASES = [
    (["report", "boolean-shallow", "--storage", "{storage}", "--out", "/proc/nope"], "--out: "),
    (
        ["report", "boolean-shallow", "--storage", "{storage}", "--out", "{tmp}/dangling"],
        "is a link to nothing",
    ),
    (["run", "boolean-shallow", "--trials", "0"], "--trials"),
    (["run", "boolean-shallow", "--trials", "abc"], "--trials"),
    ([*RUN, "--trials", "2", "--min-width", "20", "--max-width", "10"], "--max-width: must be"),
    ([*RUN, "--trials", "2", "--device", "cuda:7"], "device"),
    ([*RUN, "--trials", "2", "--device", "tpu"], "device"),
    (["run", "boolean-shallow", "--trials", "2", "--storage", "not a url"], "malformed URL"),
    (["run", "boolean-shallow", "--trials", "2", "--storage", "sqlite:///:memory:"], "in-memory"),
    (["run", "boolean-shallow", "--trials", "2", "--storage", "sqlite://"], "in-memory"),
    (
        [
            "run",
            "boolean-shallow",
            "--trials",
            "2",
            "--storage",
            "sqlite:////nonexistent-dir/sub/x.db",
        ],
        "does not exist",
    ),
    (
        ["run", "boolean-shallow", "--trials", "2", "--storage", "sqlite:///{tmp}/a-file/x.db"],
        "is not a directory",
    ),
    (
        [
            "run",
            "boolean-shallow",
            "--trials",
            "2",
            "--storage",
            "postgresql://u:hunter2@127.0.0.1:1/db",
        ],
        "cannot open postgresql://u:***@",
    ),
    (
        [
            "run",
            "boolean-shallow",
            "--trials",
            "2",
            "--storage",
            "postgresql://u:hunter2@x@127.0.0.1:1/db",
        ],
        "write an '@' in the password as %40",
    ),
    (
        ["list", "--storage", "postgresql://u@127.0.0.1:1/db?password=hunter2"],
        "cannot open postgresql://u@127.0.0.1:1/db?password=***",
    ),
    (["list", "--storage", "postgresql://u:hunter2@127.0.0.1:/db"], "malformed URL"),
    (["list", "--storage", "postgresql://u:hunter2@127.0.0.1:abc/db"], "malformed URL"),
    (["run", "boolean-wide", "--trials", "2"], "unknown study 'boolean-wide'"),
    ([*RUN, "--trials", "2", "--function-seed", str(2**64)], "--function-seed: must be"),
    ([*RUN, "--trials", "2", "--function-seed", "1"], "--function-seed 1 (stored: 0)"),
    ([*RUN, "--trials", "2", "--target-loss", "0"], "--target-loss"),
    ([*RUN, "--trials", "2", "--target-loss", "nan"], "--target-loss"),
    ([*RUN, "--trials", "2", "--required-rate", "1.5"], "--required-rate"),
    ([*RUN, "--trials", "2", "--batch-sizes", "x"], "--batch-sizes"),
    ([*RUN, "--trials", "2", "--batch-sizes", "0,8"], "--batch-sizes"),
    ([*RUN, "--trials", "2", "--max-epochs", "0"], "--max-epochs"),
    ([*RUN, "--trials", "2", "--input-bits", "40"], "--input-bits"),
    ([*RUN, "--trials", "2", "--output-bits", "0"], "--output-bits"),
    ([*RUN, "--trials", "2", "--min-layers", "3", "--max-layers", "2"], "--max-layers"),
    ([*RUN, "--trials", "2", "--min-learning-rate", "0"], "--min-learning-rate"),
    ([*RUN, "--trials", "2", "--seeds", "0"], "--seeds: must be"),
    ([*RUN, "--trials", "2", "--population", "0"], "--population"),
    ([*RUN, "--trials", "2", "--workers", "0"], "--workers"),
    ([*RUN, "--trials", "2", "--workers", "512"], "--workers: must be an integer from 1 to"),
    ([*RUN, "--trials", "2", "--sampler-seed", "-1"], "--sampler-seed"),
    ([*RUN, "--trials", "2", "--dataset", "mnist"], "--dataset does not apply"),
    (
        ["run", "fashion-mlp", "--trials", "2", "--storage", "{storage}", "--population", "4"],
        "--population does not apply",
    ),
    (
        ["run", "fashion-cnn", "--trials", "2", "--storage", "{storage}", "--max-width", "8"],
        "--max-width does not apply",
    ),
    (
        [
            "run",
            "fashion-mlp",
            "--dataset",
            "mnist",
            "--trials",
            "1",
            "--storage",
            "{storage}",
            "--data-dir",
            "{tmp}/nothing-here",
        ],
        "nothing-here does not exist; pass --data-dir DIR holding the four MNIST IDX files",
    ),
    (
        [
            "run",
            "fashion-mlp",
            "--trials",
            "1",
            "--storage",
            "{storage}",
            "--validation-size",
            "0",
        ],
        "--validation-size",
    ),
    (
        [
            "run",
            "fashion-mlp",
            "--trials",
            "1",
            "--storage",
            "{storage}",
            "--study-name",
            "boolean-shallow",
        ],
        "exists as a boolean-shallow study",
    ),
    (["report", "nope", "--storage", "{storage}"], "study 'nope' not found"),
    (
        ["report", "stuck", "--storage", "{storage}", "--out", "{tmp}/stuck-report"],
        "no finished trial to report yet (1 fail, 1 running)",
    ),
    (
        ["report", "images", "--storage", "{storage}", "--out", "{tmp}/images-report"],
        "no finished trial to report yet (no trials)",
    ),
    (["report", "x", "--storage", "sqlite:///{tmp}/missing.db"], "no store at"),
    (
        ["report", "boolean-shallow", "--storage", "{storage}", "--out", "{tmp}/a-file"],
        "not a directory",
    ),
    (["export", "boolean-shallow", "--storage", "{storage}"], "is a Boolean width study"),
    (["certify", "images", "--storage", "{storage}"], "is an image study"),
    (["certify", "boolean-shallow", "--storage", "{storage}", "--seeds", "0"], "--seeds"),
    (["certify", "boolean-shallow", "--storage", "{storage}", "--top", "0"], "--top"),
    (["dashboard", "--storage", "{storage}", "--port", "70000"], "--port"),
    (["dashboard", "--storage", "sqlite:///{tmp}/missing.db"], "no store at"),
    (
        ["dashboard", "--storage", "{storage}", "--host", "no-such-host.invalid"],
        "dashboard: cannot listen on no-such-host.invalid",
    ),
    (["dashboard", "--storage", "{storage}", "--port", "{busy}"], "cannot listen on"),
    (["predict", "x", "--dir", "{tmp}/garbage", "--image", "{tmp}/huge.png"], "model.pt"),
    (["predict", "x", "--dir", "{tmp}/badconfig", "--image", "{tmp}/huge.png"], "config.json"),
    (["predict", "x", "--dir", "{tmp}/hostile", "--image", "{tmp}/huge.png"], "model.pt"),
    (["predict", "x", "--dir", "{tmp}/nothing", "--index", "0"], "no exported model"),
    (["predict", "x", "--dir", "{tmp}/nested", "--index", "0"], "not a usable export config"),
    (["predict", "x", "--dir", "{tmp}/bigconfig", "--index", "0"], "is not an export config"),
    (["predict", "x", "--dir", "{tmp}/hugenet", "--index", "0"], "config.json"),
    (["data", "mnist", "--data-dir", "{tmp}/fashion"], "FashionMNIST train labels"),
    (["data", "mnist", "--data-dir", "{tmp}/same"], "are the same file"),
    (["bench", "boolean", "--trials", "0"], "--trials"),
    (
        [
            "run",
            "boolean-shallow",
            "--trials",
            "3",
            "--storage",
            "{storage}",
            "--report",
            "--report-dir",
            "{tmp}/a-file",
        ],
        "--report-dir: ",
    ),
    (
        [
            "run",
            "boolean-shallow",
            "--trials",
            "3",
            "--storage",
            "{storage}",
            "--report",
            "--report-dir",
            "{tmp}/a-file/below",
        ],
        "--report-dir: cannot create",
    ),
    (["data", "mnist", "--data-dir", "{tmp}/no-such-dir", "--download"], "does not exist"),
    (
        [
            "run",
            "fashion-mlp",
            "--trials",
            "1",
            "--storage",
            "{storage}",
            "--data-dir",
            "{tmp}/no-such-dir",
        ],
        "no-such-dir does not exist",
    ),
    (["data", "fashion-mnist", "--data-dir", "{tmp}/a-file"], "is not a directory"),
    # only our own stores are written: another application's database, an empty file for a
    # command that only reads, a pipe, a device
    (["list", "--storage", "sqlite:///{tmp}/other.db"], "SQLite database of another application"),
    (
        ["run", "boolean-shallow", "--trials", "1", "--storage", "sqlite:///{tmp}/other.db"],
        "SQLite database of another application",
    ),
    (["report", "x", "--storage", "sqlite:///{tmp}/other.db"], "of another application"),
    (["list", "--storage", "sqlite:///{tmp}/empty.db"], "is empty, not a store"),
    (["dashboard", "--storage", "sqlite:///{tmp}/empty.db"], "is empty, not a store"),
    (["list", "--storage", "sqlite:///{tmp}/fifo.db"], "is not a regular file"),
    (
        ["run", "boolean-shallow", "--trials", "1", "--storage", "sqlite:///{tmp}/fifo.db"],
        "is not a regular file",
    ),
    (
        ["run", "boolean-shallow", "--trials", "1", "--storage", "sqlite:////dev/null"],
        "is not a regular file",
    ),
    # the frontier checks its whole grid before it trains or stores anything
    (["frontier", "run", "--storage", "{storage}", "--budgets", "1000,2000000"], "budgets"),
    (["frontier", "run", "--storage", "{storage}", "--function-seeds", str(2**63)], "function"),
    (["frontier", "run", "--storage", "{storage}", "--depths", "1,0"], "depths"),
    (["frontier", "run", "--storage", "{storage}", "--heldout-seeds", "10"], "--heldout-seeds"),
    (["frontier", "run", "--storage", "{storage}", "--required-rate", "nan"], "required"),
    (["frontier", "run", "--storage", "sqlite:///{tmp}/other.db"], "of another application"),
    # a study name is a name, never a path (nor a line, nor a page)
    *[
        (
            [
                "run",
                "boolean-shallow",
                "--trials",
                "3",
                "--storage",
                "{storage}",
                f"--study-name={hostile}",  # '=' so that "-x" is a value
            ],
            "--study-name: must be 1 to 100 letters",
        )
        for hostile in [
            "../boolean-shallow",
            "../../x",
            "/tmp/abs",
            ".",
            "..",
            "a\nb",
            "x" * 300,
            "-x",
            " x",
            "a/b",
        ]
    ],
]


BUSY = socket.socket()  # a port someone else listens on
BUSY.bind(("127.0.0.1", 0))
BUSY.listen()


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_and_changes_no_store(world, capsys, argv, expected):
    tmp, storage = world
    argv = [a.format(storage=storage, tmp=tmp, busy=BUSY.getsockname()[1]) for a in argv]
    store = Path(storage.removeprefix("sqlite:///"))
    before = {p: fingerprint(p) for p in tmp.rglob("*") if p.is_file()}
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    out, err = capsys.readouterr()
    assert "optuna-dashboard for" not in out  # no banner before the error
    assert status not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and expected in lines[0], lines[0]
    assert "hunter2" not in err
    after = {p: fingerprint(p) for p in tmp.rglob("*") if p.is_file()}
    changed = {p for p in after if before.get(p) != after[p]} - {Path(f"{store}.lock")}
    assert changed == set(), changed
    assert not Path("/tmp/study-hostile-marker").exists()
    assert not Path("/dev/null-journal").exists()
    assert not any((tmp / d).exists() for d in ("no-such-dir", "stuck-report", "images-report"))


def test_delete_with_stdin_closed_asks_for_yes_in_one_line(world):
    """`study delete NAME <&-`: no terminal to ask on, and no stdin at all: one line."""
    import subprocess
    import sys

    _, storage = world
    done = subprocess.run(
        [sys.executable, "-m", "study.cli", "delete", "boolean-shallow", "--storage", storage],
        capture_output=True, text=True, preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "study: error: delete: 'boolean-shallow' has 2 trials; add --yes to delete"
    ]


@pytest.mark.parametrize("limit", [None, 8_000_000])
def test_a_population_that_cannot_fit_is_refused_before_anything_is_claimed(tmp_path, limit):
    """Networks that cannot fit in memory (available memory, or `ulimit -v`) are refused in one
    line naming the flags, before a store is made or a trial claimed."""
    import resource
    import subprocess
    import sys

    def limited():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit * 1024, limit * 1024))

    store = tmp_path / "h.db"
    argv = [
        "run",
        "boolean-shallow",
        "--trials",
        "64",
        "--storage",
        f"sqlite:///{store}",
        "--population",
        "64",
        "--seeds",
        "100",
        "--max-width",
        "4096",
        "--input-bits",
        "14",
    ]
    if limit is None:  # beyond any machine's memory
        argv[argv.index("--seeds") + 1] = "10000"
        argv[argv.index("--max-width") + 1] = "65536"
        argv[argv.index("--input-bits") + 1] = "16"
    done = subprocess.run([sys.executable, "-m", "study.cli", *argv], capture_output=True,
                          text=True, preexec_fn=limited, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("study: error: memory: ")
    assert "--population" in done.stderr and "GiB" in done.stderr
    if limit is not None:
        assert "ulimit -v" in done.stderr
    assert not store.exists()
