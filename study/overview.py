"""What a store holds, in brief: `study list` (every study) and `study best` (one answer).

Only reads the store.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState

from study.storage import load_study, open_storage
from study.studies import CERTIFICATION_ATTR, EXPORT_ATTR, best_feasible, describe, kind_of


def _kind(study: optuna.Study) -> str:
    return kind_of(study) or "other"


def _answer(study: optuna.Study) -> dict[str, Any] | None:
    """A frontier cell's confirmed answer (the `answers.json` entry), else None."""
    from study.frontier import stored_answer

    answer = stored_answer(study)
    return None if answer is None else answer.to_dict()


def list_studies(storage_url: str) -> list[dict[str, Any]]:
    """One row per study: kind, trials by state, best value, last activity."""
    storage = open_storage(storage_url, heartbeat=False)
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        states = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        times = [t.datetime_complete or t.datetime_start for t in trials]
        times = [t for t in times if t is not None]
        kind = _kind(study)
        best = best_feasible(study) if len(study.directions) == 1 else None
        value = None if best is None else best.value
        if kind == "frontier" and not summary.study_name.endswith("-recipe"):
            value = (_answer(study) or {}).get("neurons")  # the confirmed width
        rows.append(
            {
                "study": summary.study_name,
                "kind": kind,
                "trials": len(trials),
                **{s: n for s, n in states.items() if n},
                "best": value,
                "last_activity": max(times).isoformat(timespec="seconds") if times else None,
            }
        )
    return rows


def best_of(name: str, storage_url: str) -> dict[str, Any]:
    """The best (or certified) configuration of study `name`, with its numbers, JSON-able."""
    study = load_study(name, open_storage(storage_url, heartbeat=False))
    kind = _kind(study)
    if kind == "frontier":
        return {"study": name, "kind": kind, "answer": _answer(study)}
    if kind == "other":
        best = best_feasible(study)
        return {"study": name, "kind": kind, "best": None if best is None else _trial(best)}
    info = describe(study)
    best = best_feasible(study)
    record: dict[str, Any] = {
        "study": name,
        "kind": kind,
        "space": info.space,
        "settings": info.settings.identity(),
        "best": None if best is None else _trial(best),
    }
    if kind == "boolean":
        certification = study.user_attrs.get(CERTIFICATION_ATTR)
        if certification is not None:
            passed = [r for r in certification["rows"] if r["learns_f"]]
            record["certified"] = min(passed, key=lambda r: r["neurons"]) if passed else None
    else:
        record["export"] = study.user_attrs.get(EXPORT_ATTR)
    return record


def _trial(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    keep = (
        "neurons",
        "hidden_layer_profile",
        "parameters",
        "success_share",
        "median_best_loss",
        "config",
        "seconds_per_epoch",
        "device",
        "baseline",
    )
    return {
        "number": trial.number,
        "value": trial.value,
        "params": trial.params,
        **{k: attrs[k] for k in keep if k in attrs},
    }


def format_list(rows: list[dict[str, Any]]) -> str:
    """The rows of `list_studies` as an aligned text table."""
    if not rows:
        return "no studies in this store"
    states = ["complete", "pruned", "fail", "running", "waiting"]
    header = ["study", "kind", "trials", *states, "best", "last activity"]
    lines = [header]
    for r in rows:
        best = r["best"]
        shown = (
            "" if best is None or (isinstance(best, float) and math.isnan(best)) else f"{best:.4g}"
        )
        lines.append(
            [
                r["study"],
                r["kind"],
                str(r["trials"]),
                *(str(r.get(s, 0)) for s in states),
                shown,
                r["last_activity"] or "",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
