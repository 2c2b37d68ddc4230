"""Finding record networks (`study records run`): the smallest widths that learn f at all.

For each (function seed, depth), downward from the cell's stated width (its frontier answer
at the budget, else at the largest budget below it): blocks of `RECORD_BLOCK` seeds, each
trained with the cell's best recipes (the answer's ranking), until a seed learns f; that seed
is trained again alone (the native kernel trains each member on its own, so alone it takes the
same steps), its weights are kept, verified with `study.records.verify` and written; a width
whose blocks all fail ends the cell. The evaluations are trials of a study
`records-f{f}-d{d}-b{budget}`, claimed like the frontier's (resumable, shared by processes);
its Optuna best trial is the smallest width that learned f at least once.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from torch.nn import functional as F

from study import records
from study.answers import Recipe, code_commit
from study.boolean_trial import BooleanTrial
from study.cell_engine import CellRun, Elsewhere, Unit, candidate_of, torch_version
from study.config import BooleanSettings, FrontierCell, FrontierPlan
from study.data import boolean_function
from study.device import limit_threads_for_tiny_models
from study.frontier import POLL_SECONDS, sleep
from study.population import Member, train_population

RECORD_BLOCK = 64
"""Seeds per evaluation (one trial of the records study)."""
RECORD_SEED = 2**40
"""Record seeds are RECORD_SEED + crc32(study name) * 2**26 + the unit's offset: far above
every frontier stage's (below 10,000,000), and no two studies, widths, recipes or blocks
share one."""
STAGE = "record"
Log = Callable[[str], None]


def study_name(cell: FrontierCell) -> str:
    return f"records-f{cell.function_seed}-d{cell.depth}-b{cell.budget}"


def seeds_of(name: str, neurons: int, rank: int, block: int) -> tuple[int, ...]:
    """The seeds of one evaluation of study `name`."""
    first = RECORD_SEED + zlib.crc32(name.encode()) * 2**26
    first += ((neurons * 8 + rank) * 64 + block) * RECORD_BLOCK
    return tuple(range(first, first + RECORD_BLOCK))


class RecordRun(CellRun):
    """A records study on the frontier's evaluation machinery (units claimed, trained as one
    population, stored as trials)."""

    def __init__(self, url: str, storage, cell: FrontierCell, threads: int, log: Log) -> None:
        settings = BooleanSettings()
        self.url, self.storage, self.cell, self.plan = url, storage, cell, FrontierPlan()
        self.settings = settings.replace(function_seed=cell.function_seed, max_epochs=cell.budget)
        self.threads, self.log, self.command, self.trained = threads, log, "", 0
        self.fn = boolean_function(settings.input_bits, cell.function_seed, settings.output_bits)
        self.study = optuna.create_study(
            storage=storage, study_name=study_name(cell), load_if_exists=True
        )


def materialize(run: RecordRun, unit: Unit, learned: int, directory: Path, command: str):
    """Train seed `learned` of `unit` again, alone, keep its weights, write the record and
    verify it; the record's path, or None when it does not hold (it is then not kept)."""
    candidate = candidate_of(run.cell, unit.neurons, unit.recipe)
    config = BooleanTrial(candidate, (learned,), run.settings, prune=False).config(0)
    weights: dict = {}
    (result,) = train_population(
        [Member(candidate.hidden_layer_profile, config)], run.fn, weights=weights
    )
    if not result.reached_target:
        run.log(f"{run.study.study_name}: seed {learned} did not learn f again alone; not kept")
        return None
    fn = run.fn
    tensors = {}
    names = records.layer_names(len(candidate.hidden_layer_profile))
    for prefix, (weight, bias) in zip(names, weights[0], strict=True):
        tensors[prefix + ".weight"] = weight.T.contiguous().numpy()  # as torch's Linear
        tensors[prefix + ".bias"] = bias.numpy()
    meta = {
        "kind": "boolean-record",
        "hidden_layer_profile": list(candidate.hidden_layer_profile),
        "neurons": candidate.neurons,
        "function_seed": fn.function_seed,
        "input_bits": fn.input_bits,
        "output_bits": fn.output_bits,
        "target_loss": run.settings.target_loss,
        "final_loss": float(result.history[-1].eval_loss),
        "epochs_run": result.epochs_run,
        "budget_epochs": run.cell.budget,
        "init_seed": learned,
        "recipe": unit.recipe.params(),
        "optimizer": "adam",
        "method": records.PLAIN,
        "study": run.study.study_name,
        "code_commit": code_commit(),
        "torch_version": torch_version(),
        "command": command,
    }
    path = records.write(directory, tensors, meta)
    check = records.verify(path)
    run.log(check.line())
    if not check.holds:
        records.remove(path)
        return None
    return path


def _kept(run: RecordRun, unit: Unit, directory: Path) -> Path | None:
    """The record of this width already written (a resumed search), if it holds."""
    profile = run.cell.profile(unit.neurons)
    path = directory / (records.name_of(run.cell.function_seed, profile) + ".json")
    try:
        return path if path.exists() and records.verify(path).holds else None
    except records.RecordError:
        return None


def _evaluate(run: RecordRun, units: Sequence[Unit]) -> dict:
    """`run.evaluate(units)`, waiting while other processes train some of them."""
    said = False
    while True:
        try:
            return run.evaluate(units)
        except Elsewhere:
            if not said:
                run.log(f"{run.study.study_name}: waiting for evaluations other processes run")
            said = True
            sleep(POLL_SECONDS)


def stated_and_recipes(
    answers: Sequence[dict[str, Any]], function_seed: int, depth: int, budget: int
) -> tuple[int, list[Recipe]] | None:
    """The cell's stated neurons and ranked recipes: its answer at `budget`, else at the
    largest budget below it (a longer budget starts from the best known width)."""
    same = [
        a for a in answers
        if a.get("function_seed") == function_seed and a.get("depth") == depth
        and a.get("budget_epochs", budget + 1) <= budget and a.get("recipe_ranking")
    ]  # fmt: skip
    if not same:
        return None
    answer = max(same, key=lambda a: a["budget_epochs"])
    return answer["neurons"], [Recipe.from_params(r["recipe"]) for r in answer["recipe_ranking"]]


def search_cell(
    run: RecordRun,
    stated: int,
    ranked: Sequence[Recipe],
    seeds_per_width: int,
    directory: Path,
    command: str,
    widths: int | None = None,
) -> Path | None:
    """Records of one cell, downward from `stated - 1` neurons (at most `widths` widths); the
    smallest one written."""
    best = None
    name = run.study.study_name
    lowest = run.cell.depth if widths is None else max(run.cell.depth, stated - widths)
    for neurons in range(stated - 1, lowest - 1, -1):
        hit = None
        for block in range(max(1, seeds_per_width // RECORD_BLOCK)):
            units = [
                Unit(STAGE, neurons, recipe, seeds_of(name, neurons, r, block), block)
                for r, recipe in enumerate(ranked)
            ]
            done = _evaluate(run, units)
            rates = [sum(done[u.key].user_attrs["learned"]) for u in units]
            run.log(f"{name}: {neurons} neurons, block {block}: learned {rates} of "
                    f"{RECORD_BLOCK} seeds per recipe")  # fmt: skip
            for unit in units:
                attrs = done[unit.key].user_attrs
                learned = [s for s, ok in zip(attrs["seeds"], attrs["learned"], strict=True) if ok]
                if learned:
                    hit = _kept(run, unit, directory) or materialize(
                        run, unit, learned[0], directory, command
                    )
                    if hit is not None:
                        break
            if hit is not None:
                break
        if hit is None:
            break  # this width's seeds ran out without a record
        best = hit
    return best


def search(
    url: str,
    storage,
    cells: Sequence[tuple[int, int]],
    budget: int,
    answers: Sequence[dict[str, Any]],
    seeds_per_width: int,
    recipes: int,
    threads: int,
    directory: Path,
    command: str,
    log: Log,
    widths: int | None = None,
    below: int | None = None,
) -> dict[tuple[int, int], Path | None]:
    """Search records below the stated width of each (function seed, depth) of `cells` (or
    below `below` neurons, e.g. a record found at a shorter budget)."""
    found: dict[tuple[int, int], Path | None] = {}
    for function_seed, depth in cells:
        known = stated_and_recipes(answers, function_seed, depth, budget)
        if known is None:
            log(f"function seed {function_seed}, depth {depth}: no frontier answer with "
                "recipes at or below this budget; skipped")  # fmt: skip
            continue
        stated, ranked = known
        stated = stated if below is None else below
        run = RecordRun(url, storage, FrontierCell(function_seed, depth, budget), threads, log)
        found[(function_seed, depth)] = search_cell(
            run, stated, ranked[:recipes], seeds_per_width, directory, command, widths
        )
    return found


# ----------------------------------------------------------------------------------------------
# the second track: prune a record's neurons one at a time, fine-tuning after each removal

PRUNED = "prune and fine-tune"


def _layers_of(path: Path) -> tuple[dict[str, Any], list[list[torch.Tensor]]]:
    """A record's description and its [weight (out, in), bias] per layer, as torch tensors."""
    meta, weights = records.read(path)
    names = records.layer_names(len(meta["hidden_layer_profile"]))
    return meta, [
        [torch.from_numpy(weights[n + ".weight"].copy()), torch.from_numpy(weights[n + ".bias"])]
        for n in names
    ]


def _forward(layers: list[list[torch.Tensor]], x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output (hidden ones after their ReLU), the logits last."""
    outputs = []
    for i, (weight, bias) in enumerate(layers):
        x = F.linear(x, weight, bias)
        x = x.relu() if i < len(layers) - 1 else x
        outputs.append(x)
    return outputs


def remove_weakest(layers: list[list[torch.Tensor]], x: torch.Tensor) -> tuple[int, int]:
    """Remove the hidden neuron whose removal changes the next layer least (its mean activation
    times the norm of its outgoing weights; a layer keeps at least one); its mean output is
    folded into the next layer's bias. Returns (layer, neuron)."""
    with torch.no_grad():
        hidden = _forward(layers, x)[:-1]
        best = None
        for i, h in enumerate(hidden):
            if h.shape[1] <= 1:
                continue
            score = h.abs().mean(dim=0) * layers[i + 1][0].norm(dim=0)
            j = int(score.argmin())
            if best is None or score[j] < best[0]:
                best = (float(score[j]), i, j)
        assert best is not None, "nothing left to remove"
        _, i, j = best
        keep = [k for k in range(hidden[i].shape[1]) if k != j]
        after = layers[i + 1]
        after[1] = after[1] + after[0][:, j] * hidden[i][:, j].mean()
        after[0] = after[0][:, keep].clone()
        layers[i] = [layers[i][0][keep].clone(), layers[i][1][keep].clone()]
    return i, j


def fine_tune(
    layers: list[list[torch.Tensor]], x: torch.Tensor, y: torch.Tensor, target: float,
    epochs: int, learning_rate: float,
) -> int | None:  # fmt: skip
    """Full-table Adam until the loss is below 0.9 x `target` with every bit right (a margin,
    so that the float64 check agrees); the epochs it took, or None."""
    params = [t.requires_grad_() for layer in layers for t in layer]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    try:
        for epoch in range(epochs + 1):
            logits = _forward(layers, x)[-1]
            loss = F.binary_cross_entropy_with_logits(logits, y)
            if loss.item() <= 0.9 * target and bool(((logits > 0) == (y > 0.5)).all()):
                return epoch
            if epoch == epochs or not math.isfinite(loss.item()):
                return None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for t in params:
            t.requires_grad_(False)
    return None


def prune(
    start: Path, directory: Path, epochs: int, learning_rate: float, command: str, log: Log
) -> Path | None:
    """From the record `start`, remove one neuron at a time and fine-tune, writing a record
    (method "prune and fine-tune") for each network that learns f again and verifies; stops at
    the first that does not. Returns the smallest record written."""
    meta, layers = _layers_of(start)
    fn = boolean_function(meta["input_bits"], meta["function_seed"], meta["output_bits"])
    limit_threads_for_tiny_models(fn.inputs.device)
    target = float(meta["target_loss"])
    smallest, spent = None, 0
    while sum(w.shape[0] for w, _ in layers[:-1]) > len(layers) - 1:
        trial = [[t.clone() for t in layer] for layer in layers]
        remove_weakest(trial, fn.inputs)
        took = fine_tune(trial, fn.inputs, fn.targets, target, epochs, learning_rate)
        profile = [w.shape[0] for w, _ in trial[:-1]]
        if took is None:
            log(f"{records.name_of(fn.function_seed, profile)}: not learned again within "
                f"{epochs} fine-tuning epochs; pruning ends")  # fmt: skip
            break
        spent += took
        layers = trial
        names = records.layer_names(len(profile))
        tensors = {}
        for name, (weight, bias) in zip(names, layers, strict=True):
            tensors[name + ".weight"] = weight.detach().contiguous().numpy()
            tensors[name + ".bias"] = bias.detach().contiguous().numpy()
        with torch.no_grad():
            loss = F.binary_cross_entropy_with_logits(_forward(layers, fn.inputs)[-1], fn.targets)
        path = records.write(directory, tensors, {
            **{k: meta[k] for k in ("kind", "function_seed", "input_bits", "output_bits",
                                    "target_loss", "init_seed", "recipe", "budget_epochs")
               if k in meta},
            "hidden_layer_profile": profile,
            "neurons": sum(profile),
            "final_loss": float(loss),
            "epochs_run": int(meta["epochs_run"]),
            "method": PRUNED,
            "pruned_from": str(start),
            "fine_tuning_epochs": spent,
            "fine_tuning": {"optimizer": "adam", "learning_rate": learning_rate,
                            "full_table_batches": True, "most_epochs_per_removal": epochs},
            "code_commit": code_commit(),
            "torch_version": torch_version(),
            "command": command,
        }, suffix="-pruned")  # fmt: skip
        check = records.verify(path)
        log(check.line())
        if not check.holds:
            records.remove(path)
            break
        smallest = path
    return smallest
