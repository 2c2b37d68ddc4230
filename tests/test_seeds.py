"""Method 3's seed ranges: no two cells, stages, blocks or answers share an initialisation seed,
and none meets the records' seeds or the seeds of method 2 and its recheck."""

import itertools

import pytest

from study import record_search
from study.answers import (
    CELL_SEED,
    CONFIRM_BLOCK,
    HELDOUT_SEED,
    SELECTION_SEED,
    STAGES,
    cell_first_seed,
    first_seed,
    stage_seeds,
)
from study.config import RECHECK_SEED, FrontierCell, FrontierGrid

BLOCK = 2**14
"""Seeds a block of method 3 holds at most."""
BLOCKS = {stage: range(CONFIRM_BLOCK, CONFIRM_BLOCK + 32) if stage == "confirm" else range(32)
          for stage in STAGES}  # fmt: skip
GRID = FrontierGrid(
    function_seeds=tuple(range(20)),
    depths=(1, 2, 3, 4),
    budgets=(250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000),
)
"""The cells run so far and many more (880): the ranges checked below."""


def test_no_two_cells_stages_or_blocks_share_a_seed():
    cells = GRID.cells()
    ranges = sorted(
        (cell_first_seed(cell.name, stage, block), cell.name, stage, block)
        for cell in cells
        for stage in STAGES
        for block in BLOCKS[stage]
    )
    assert len(ranges) == len(cells) * len(STAGES) * 32
    for (first, *which), (after, *then) in itertools.pairwise(ranges):
        assert first + BLOCK <= after, (which, then)  # each block's 2**14 seeds end first
    low, high = ranges[0][0], ranges[-1][0] + BLOCK
    # above every record seed, the method-2 seeds and their recheck seeds; torch takes them
    assert low >= CELL_SEED > record_search.seeds_of("records-f9-d4-b256000", 512, 7, 63)[-1]
    assert min(record_search.RECORD_SEED, CELL_SEED) > RECHECK_SEED + 10**6 > HELDOUT_SEED
    assert high < 2**63


def test_stage_seeds_are_the_cells_own_under_method_3_and_shared_under_method_2():
    cell, other = FrontierCell(0, 1, 64000), FrontierCell(0, 2, 64000)
    mine = stage_seeds(cell, 3, "confirm", 96, CONFIRM_BLOCK + 1)
    assert mine[0] == cell_first_seed(cell.name, "confirm", CONFIRM_BLOCK + 1)
    assert mine == tuple(range(mine[0], mine[0] + 96))
    assert not set(mine) & set(stage_seeds(other, 3, "confirm", 96, CONFIRM_BLOCK + 1))
    assert not set(stage_seeds(cell, 3, "recipe", 4)) & set(stage_seeds(cell, 3, "width", 10))
    # method 2, as its cells were stored: every cell the same seeds
    assert stage_seeds(cell, 2, "width", 10) == stage_seeds(other, 2, "recipe", 10)
    assert stage_seeds(cell, 2, "width", 3) == (SELECTION_SEED, SELECTION_SEED + 1,
                                                SELECTION_SEED + 2)  # fmt: skip
    assert stage_seeds(cell, 2, "confirm", 2, CONFIRM_BLOCK)[0] == first_seed(CONFIRM_BLOCK)


def test_a_block_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="block"):
        cell_first_seed("frontier-f0-d1-b100", "confirm", CONFIRM_BLOCK + 32)
    with pytest.raises(ValueError, match="block"):
        cell_first_seed("frontier-f0-d1-b100", "curve", CONFIRM_BLOCK)
    with pytest.raises(ValueError, match="at most"):
        stage_seeds(FrontierCell(0, 1, 100), 3, "curve", BLOCK + 1)


def test_recheck_seeds_default_to_the_cells_own_range():
    from types import SimpleNamespace

    from study.recheck import recheck_seed

    cell = FrontierCell(3, 2, 16000)
    mine = SimpleNamespace(cell=cell, plan=SimpleNamespace(method=3))
    assert recheck_seed(mine) == cell_first_seed(cell.name, "recheck")
    assert recheck_seed(SimpleNamespace(cell=cell, plan=SimpleNamespace(method=2))) == RECHECK_SEED


def test_the_committed_method_3_cells_share_no_seed():
    """Every seed trained in `results/frontier3.db` (and its recheck) belongs to one cell, one
    stage and one block: widths of one block share its seeds by design, nothing else does."""
    import json
    import sqlite3
    from pathlib import Path

    root = Path(__file__).parent.parent / "results"
    path = root / "frontier3.db"
    if not path.exists():
        pytest.skip("no committed frontier3.db")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT s.study_name, t.trial_id, a.key, a.value_json FROM trial_user_attributes a "
            "JOIN trials t ON t.trial_id = a.trial_id JOIN studies s ON s.study_id = t.study_id "
            "WHERE a.key IN ('seeds', 'stage', 'block')"
        ).fetchall()
    trials: dict[int, dict] = {}
    for study, trial, key, value in rows:
        trials.setdefault(trial, {"cell": study.removesuffix("-recipe")})[key] = json.loads(value)
    owner: dict[int, tuple] = {}
    for t in trials.values():
        where = (t["cell"], t.get("stage"), t.get("block", 0))
        for seed in t.get("seeds", []):
            assert owner.setdefault(seed, where) == where, seed
    cells = {t["cell"] for t in trials.values()}
    assert len(cells) >= 2 and len(owner) >= 400
    for entry in json.loads((root / "frontier3" / "recheck.json").read_text())["rechecks"]:
        rechecked = {s["seed"] for s in entry["seeds"]}
        assert entry["first_seed"] == cell_first_seed(entry["study"], "recheck")
        assert not rechecked & set(owner)
