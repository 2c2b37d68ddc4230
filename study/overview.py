"""What a store holds, in brief: `study list` (every study) and `study best` (one answer).

Only reads the store.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState

from study.storage import load_study, open_storage
from study.studies import (
    CERTIFICATION_ATTR,
    EXPORT_ATTR,
    best_feasible,
    describe,
    kind_of,
    stored_attrs,
)


def _kind(study: optuna.Study) -> str:
    return kind_of(study) or "other"


def _answer(study: optuna.Study) -> dict[str, Any] | None:
    """A frontier cell's confirmed answer (the `answers.json` entry), else None."""
    from study.answers import stored_answer

    answer = stored_answer(study)
    return None if answer is None else answer.to_dict()


def list_studies(storage_url: str) -> list[dict[str, Any]]:
    """One row per study: kind, trials by state (every state, zeros too), best value, last
    activity.

    Reads each study's attributes and a digest of its trials (`rdb.trial_digest`: counts,
    times, complete values), never the trials themselves."""
    from study import rdb
    from study.answers import stored_answer

    storage = open_storage(storage_url, heartbeat=False)
    backend = rdb.backend(storage)
    digest = rdb.trial_digest(backend) if backend is not None else None
    rows = []
    for study in storage.get_all_studies():
        if digest is None:
            trials = _digest_of(optuna.load_study(study_name=study.study_name, storage=storage))
        else:
            trials = digest.get(study.study_name, {"states": {}, "last": None, "values": []})
        kind = _kind(study)
        value = None
        if kind == "frontier" and not study.study_name.endswith("-recipe"):
            answer = stored_answer(study)
            value = None if answer is None else answer.neurons  # the confirmed width
        elif len(study.directions) == 1:
            feasible = [v for v, ok in trials["values"] if ok]
            pick = max if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else min
            value = pick(feasible) if feasible else None
        last = trials["last"]
        rows.append(
            {
                "study": study.study_name,
                "kind": kind,
                "trials": sum(trials["states"].values()),
                **{s.name.lower(): trials["states"].get(s.name, 0) for s in TrialState},
                "best": value,
                "last_activity": last.isoformat(timespec="seconds") if last else None,
            }
        )
    return rows


def _digest_of(study: optuna.Study) -> dict[str, Any]:
    """`rdb.trial_digest`'s entry, from the trials (a storage without Optuna's models)."""
    trials = study.get_trials(deepcopy=False)
    times = [t.datetime_complete or t.datetime_start for t in trials]
    return {
        "states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
        "last": max((t for t in times if t is not None), default=None),
        "values": [
            (t.value, all(c <= 0.0 for c in t.constraints.values()))
            for t in trials
            if t.state == TrialState.COMPLETE and t.values is not None and len(t.values) == 1
        ],
    }


BEST_KEYS = ("study", "kind", "space", "settings", "best", "certified", "export", "answer")
"""`study best --json`: these keys for every kind of study, None where one does not apply.
`best`: the best trial (number, value, params and what it stored: neurons and
hidden_layer_profile as a list for Boolean studies, config for image ones); `certified`: the
smallest configuration that passed certification (a Boolean study's row of it, the profile a
list too); `export`: an image study's exported model and its test accuracy; `answer`: a
frontier cell's confirmed width (the `answers.json` entry; for a cell of the earlier method,
the answer it stored). `best` is Optuna's best trial (`optuna best-trial`) for every study with
one objective, frontier cells and recipe studies too."""


def best_of(name: str, storage_url: str) -> dict[str, Any]:
    """The best (or certified) configuration of study `name`, with its numbers, JSON-able, in
    one shape for every kind (`BEST_KEYS`)."""
    study = load_study(name, open_storage(storage_url, heartbeat=False))
    kind = _kind(study)
    record: dict[str, Any] = dict.fromkeys(BEST_KEYS)
    record.update(study=name, kind=kind)
    best = best_feasible(study) if len(study.directions) == 1 else None
    record["best"] = None if best is None else _trial(best)
    if kind == "frontier":
        from study.answers import earlier_answer

        record.update(space="frontier", answer=_answer(study) or earlier_answer(study))
        return record
    if kind == "other":
        return record
    info = describe(study)
    record.update(space=info.space, settings=info.settings.identity())
    if kind == "boolean":
        certification = stored_attrs(study).get(CERTIFICATION_ATTR)
        passed = [r for r in (certification or {}).get("rows", []) if r["learns_f"]]
        if passed:
            row = dict(min(passed, key=lambda r: r["neurons"]))
            row["hidden_layer_profile"] = [int(w) for w in row["hidden_layer_profile"].split("-")]
            record["certified"] = row
    else:
        record["export"] = stored_attrs(study).get(EXPORT_ATTR)
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


def format_best(record: dict[str, Any]) -> str:
    """`study best` for a person: the answer in one line, then the essentials."""
    head = f"{record['study']} ({record['kind']})"
    best, answer = record["best"], record["answer"]
    lines = []
    if answer is not None and "neurons" in answer:
        rate = ""
        if answer.get("method", 0) >= 3:
            pooled = answer["all_heldout"]
            rate = (f", stated on {pooled['heldout_successes']}/{pooled['heldout_seeds']} "
                    f"held-out seeds ({len(pooled['blocks'])} blocks)")  # fmt: skip
        elif "confirmation_seeds" in answer:
            rate = (f", confirmed on {answer['confirmation_successes']}/"
                    f"{answer['confirmation_seeds']} fresh seeds")  # fmt: skip
        profile = answer.get("profile") or answer.get("hidden_layer_profile")
        lines.append(f"{head}: {answer['neurons']} neurons {profile or ''}".rstrip() + rate)
    elif best is None:
        lines.append(f"{head}: no complete trial")
    elif record["kind"] == "boolean":
        lines.append(f"{head}: best trial #{best['number']}: {best.get('neurons')} neurons "
                     f"{best.get('hidden_layer_profile')}")  # fmt: skip
    elif record["kind"] == "image":
        lines.append(f"{head}: best trial #{best['number']}: validation accuracy "
                     f"{best['value']:.4f}")  # fmt: skip
    else:
        lines.append(f"{head}: best trial #{best['number']}: value {best['value']:.6g}")
    if best is not None and len(lines) == 1 and answer is not None:
        lines.append(f"  Optuna's best trial: #{best['number']}, value {best['value']:.6g}")
    if best is not None:
        extra = [f"{k.replace('_', ' ')} {_short(best[k])}"
                 for k in ("parameters", "seconds_per_epoch") if k in best]  # fmt: skip
        params = ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items())
        lines.append(f"  params: {params}" + (f" ({', '.join(extra)})" if extra else ""))
    certified = record["certified"]
    if certified:
        lines.append(f"  certified: {certified['neurons']} neurons "
                     f"{certified['hidden_layer_profile']} (trial {certified['trial']}, "
                     f"{certified['seeds']} seeds)")  # fmt: skip
    export = record["export"]
    if export:
        seeds = export.get("test_accuracy_seeds") or [export["test_accuracy"]]
        mean = sum(seeds) / len(seeds)
        lines.append(f"  export: trial {export['trial']}, test accuracy {mean:.4f} (mean of "
                     f"{len(seeds)} seed(s): {', '.join(f'{a:.4f}' for a in seeds)})")  # fmt: skip
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
