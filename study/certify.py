"""Certification: retrain the smallest feasible configuration and the next smaller one.

The search found a width that learned f on r seeds. The evidence behind a stated w_1/w_2 is
a retraining of that configuration and of the next smaller one (one neuron fewer; for deep
nets, one fewer in each layer in turn) on fresh seeds, with the same other hyperparameters,
without the early-stop rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from study.config import BooleanCandidate, BooleanSettings
from study.errors import StudyError
from study.studies import CERTIFICATION_ATTR, best_feasible, load, store_attr, stored_attrs
from study.tables import markdown_table

FRESH_SEED_OFFSET = 1_000_000
"""Certification seeds start here: disjoint from every seed a search trial uses."""


SHOWN = [
    "role",
    "trial",
    "hidden_layer_profile",
    "neurons",
    "parameters",
    "success_share",
    "median_best_loss",
    "max_best_loss",
    "learns_f",
]


@dataclass(frozen=True)
class Certification:
    """A certification: one row per retrained configuration. It is stored with the study it
    certifies (`record`), so that a report shows the certification of its own store only."""

    study_name: str
    settings: BooleanSettings
    table: pd.DataFrame
    command: str | None = None

    def record(self) -> dict:
        """The JSON-able form stored as the study's `certification` user attribute."""
        rows = self.table.astype(object).where(self.table.notna(), None).to_dict("records")
        return {"first_seed": FRESH_SEED_OFFSET, "rows": rows, "command": self.command}

    @classmethod
    def from_record(cls, study_name: str, settings: BooleanSettings, record: dict):
        table = pd.DataFrame(record["rows"])
        table["trial"] = table["trial"].astype("Int64")  # neighbours have no trial of their own
        return cls(study_name, settings, table, record.get("command"))

    def body(self) -> str:
        """The certification as markdown, without a title (a report embeds it)."""
        s = self.settings
        return (
            f"Retrained on {self.table['seeds'].iloc[0]} fresh initialisation seeds "
            f"(seeds {FRESH_SEED_OFFSET}+), same learning rate, batch size and epoch budget as "
            "the trial, no early-stop rule. A configuration learns f when at least "
            f"{s.required_rate:.0%} of the seeds reach a full-table loss <= {s.target_loss:g} "
            "with every bit right.\n\n"
            + markdown_table(self.table[SHOWN])
            + f"\n\n{self.verdict()}\n"
            + (f"\nProduced by: `{self.command}`\n" if self.command else "")
        )

    def certified(self) -> pd.Series | None:
        """The row with the fewest neurons that learned f on the fresh seeds (None if none)."""
        passed = self.table[self.table["learns_f"]]
        if passed.empty:
            return None
        return passed.sort_values(["neurons", "median_best_loss"]).iloc[0]

    def verdict(self) -> str:
        """One sentence: the certified answer, or that none of the retrained ones passed."""
        row = self.certified()
        if row is None:
            return (
                "None of the retrained configurations learned f on the required share of "
                "fresh seeds: the stated width needs more neurons or a larger budget."
            )
        return (
            f"Certified: {row['neurons']} hidden neurons ({row['hidden_layer_profile']}, "
            f"{row['parameters']} parameters) learned f on {row['success_share']:.0%} of "
            f"{row['seeds']} fresh seeds."
        )


def smaller_neighbours(candidate: BooleanCandidate) -> list[BooleanCandidate]:
    """The configurations with one neuron fewer in one layer (layers of width 1 are kept)."""
    neighbours = []
    for i, width in enumerate(candidate.hidden_layer_profile):
        if width > 1:
            profile = list(candidate.hidden_layer_profile)
            profile[i] -= 1
            neighbours.append(
                BooleanCandidate(
                    tuple(profile), candidate.learning_rate, candidate.batch_size, candidate.epochs
                )
            )
    return neighbours


def runner_up_trials(study, best, count: int) -> list:
    """The next `count` smallest feasible trials after `best`, one per hidden profile."""
    feasible = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("learns_f") and t.number != best.number
    ]
    feasible.sort(key=lambda t: (t.user_attrs["neurons"], t.user_attrs["median_best_loss"]))
    seen = {tuple(best.user_attrs["hidden_layer_profile"])}
    chosen = []
    for t in feasible:
        profile = tuple(t.user_attrs["hidden_layer_profile"])
        if profile not in seen and len(chosen) < count:
            seen.add(profile)
            chosen.append(t)
    return chosen


def candidate_from_trial(trial) -> BooleanCandidate:
    """The configuration a trial trained: its stored recipe (a trial stored before recipes
    were: the parameters of the tool's own spaces)."""
    recipe = trial.user_attrs.get("recipe") or trial.params
    return BooleanCandidate(
        tuple(trial.user_attrs["hidden_layer_profile"]),
        float(recipe["learning_rate"]),
        int(recipe["batch_size"]),
        int(recipe["epochs"]),
        recipe.get("lr_schedule", "constant"),
        float(recipe.get("warmup_fraction", 0.0)),
        float(recipe.get("lr_floor", 0.0)),
    )


def certify(
    study_name: str,
    storage: str,
    seeds: int = 10,
    device: str = "auto",
    top: int = 1,
    log=print,
    command: str | None = None,
) -> Certification:
    """Retrain the best feasible configuration and its smaller neighbours on fresh seeds.

    With `top` > 1 the next smallest feasible configurations (distinct profiles) are
    retrained too: near the boundary, a configuration that passed on r seeds in the search
    may fail on fresh ones (the search keeps its luckiest trials), and the smallest that
    passes certification is the answer to state. All configurations and seeds train together
    as one population (`study.population`), each to its full epoch budget or the target,
    without the early-stop rule.
    """
    if seeds < 1:
        raise StudyError(f"seeds: must be at least 1, got {seeds}")
    if top < 1:
        raise StudyError(f"top: must be at least 1, got {top}")
    from study import device as dev
    from study.boolean_trial import BooleanTrial, train_together
    from study.data import boolean_function

    study, info = load(study_name, storage, kind="boolean", command="certify")
    settings = info.settings
    device_ = dev.resolve_device(device)
    dev.limit_threads_for_tiny_models(device_)
    best = best_feasible(study)
    if best is None:
        raise StudyError(f"study {study_name!r} has no feasible trial yet; run more trials first")
    fn = boolean_function(
        settings.input_bits, settings.function_seed, settings.output_bits, device_
    )
    roles = _roles(study, best, top)
    stored = stored_certification(study, settings)
    if stored is not None and _same_work(stored, roles, seeds):
        log(
            f"{study_name!r} is certified already with these configurations and {seeds} fresh "
            "seeds (the stored certification is shown; nothing retrained or written)"
        )
        return stored
    for _, _, candidate in roles:
        log(f"training {candidate.describe()} on {seeds} fresh seeds")
    # every configuration x seed is one member of a single population, trained to its full
    # budget or the target (no early-stop rule: the rate on fresh seeds is the evidence)
    fresh = [FRESH_SEED_OFFSET + i for i in range(seeds)]
    runs = [
        BooleanTrial(candidate, fresh, settings, prune=False, decisive=False)
        for _, _, candidate in roles
    ]
    train_together(runs, fn, threads=os.cpu_count() or 1)
    table = pd.DataFrame(
        [_row(role, trial, run, fn) for (role, trial, _), run in zip(roles, runs, strict=True)]
    )
    table["trial"] = table["trial"].astype("Int64")  # neighbours have no trial of their own
    cert = Certification(study_name, settings, table, command)
    store_attr(study, CERTIFICATION_ATTR, cert.record())  # stored with what it certifies
    return cert


def _same_work(stored: Certification, roles, seeds: int) -> bool:
    """Whether `stored` retrained exactly `roles` on the same `seeds` fresh seeds (training is
    seeded: doing it again would store the same table)."""
    table = stored.table
    if len(table) != len(roles) or (table["seeds"] != seeds).any():
        return False
    for row, (role, trial, candidate) in zip(table.to_dict("records"), roles, strict=True):
        mine = {
            "role": role,
            "trial": trial,
            "hidden_layer_profile": "-".join(map(str, candidate.hidden_layer_profile)),
            "learning_rate": candidate.learning_rate,
            "batch_size": candidate.batch_size,
            "epochs": candidate.epochs,
        }
        theirs = {key: row[key] for key in mine}
        theirs["trial"] = None if pd.isna(theirs["trial"]) else int(theirs["trial"])
        if theirs != mine:
            return False
    return True


def _roles(study, best, top: int) -> list[tuple[str, int | None, BooleanCandidate]]:
    """(role, trial number, configuration) of everything certification retrains: the best,
    its smaller neighbours (no trial of their own) and the next `top - 1` runners-up."""
    found = candidate_from_trial(best)
    roles = [("found", best.number, found)]
    roles += [("one fewer", None, c) for c in smaller_neighbours(found)]
    for rank, trial in enumerate(runner_up_trials(study, best, top - 1), start=2):
        roles.append((f"found #{rank}", trial.number, candidate_from_trial(trial)))
    return roles


def _row(role: str, trial: int | None, run, fn) -> dict:
    """One row of the certification table: a configuration and how its fresh seeds did."""
    candidate, outcome = run.candidate, run.outcome()
    return {
        "role": role,
        "trial": trial,
        "hidden_layer_profile": "-".join(map(str, candidate.hidden_layer_profile)),
        "neurons": candidate.neurons,
        "parameters": candidate.parameters(fn.input_bits, fn.output_bits),
        "learning_rate": candidate.learning_rate,
        "batch_size": candidate.batch_size,
        "epochs": candidate.epochs,
        "seeds": len(run.seeds),
        "success_share": outcome.success_share,
        "median_best_loss": outcome.median_best_loss,
        "max_best_loss": max(r.best_loss for r in outcome.runs),
        "learns_f": outcome.learns,
        "seconds": round(max(r.result.seconds for r in outcome.runs), 1),
    }


def stored_certification(study, settings: BooleanSettings) -> Certification | None:
    """The certification stored with `study` (None when it was never certified)."""
    record = stored_attrs(study).get(CERTIFICATION_ATTR)
    if record is None:
        return None
    return Certification.from_record(study.study_name, settings, record)


def write_certification(cert: Certification, out_dir: Path) -> Path:
    """Write certification.csv and certification.md under `out_dir`; return the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert.table.to_csv(out_dir / "certification.csv", index=False)
    text = f"# Certification of `{cert.study_name}`\n\n{cert.body()}"
    path = out_dir / "certification.md"
    path.write_text(text)
    return path
