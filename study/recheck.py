"""Recheck published frontier answers: retrain each stated width, with its recipe and budget, on
seeds no run of the frontier used, with the sequential trainer (`study.trainer`, one network
at a time; the frontier stated its answers with the population engine), and say whether it
holds up.

`study frontier recheck` reads only answers.json, so anyone with the file can run it. Every
seed trains to the end of its budget unless it reaches the target first (no pruning, as in a
confirmation block); a seed counts when it learns f (the target loss with every bit right).
Each answer gets its rate on those seeds, the exact 95% interval, and the chance of so few
successes were its true rate the required one (below 5%: it does not hold up).

Seeds train in worker processes of one thread each, one process per core by default, and are
written to recheck.json as they end; a rerun with the same answers and seeds reads them back,
so a long recheck resumes.
`--engine population` trains them with the engine the answers were stated with instead (all
seeds of an answer at once; kept answer by answer), to tell a difference of engines from one of
seeds: the two are stored side by side.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from study import interrupt
from study.answers import (
    READABLE_SCHEMAS,
    SCHEMA_VERSION,
    FrontierAnswer,
    cell_first_seed,
    code_commit,
    exact_interval,
)
from study.cell_engine import candidate_of, torch_version
from study.config import RECHECK_ENGINES, RECHECK_SEED
from study.errors import ConfigError
from study.tables import markdown_table

if TYPE_CHECKING:
    from study.boolean_trial import BooleanTrial, SeedRun
    from study.data import BooleanFunction

WAIT_SECONDS = 0.5
"""How often the parent looks for a stop while its workers train."""
SHORT_OF = 0.05
"""An answer falls short when fewer successes than its recheck's would happen less often than
this at the required rate."""


@dataclass(frozen=True)
class SeedResult:
    """One recheck seed: whether it learned f, when it ended, its best loss."""

    seed: int
    learned: bool
    epochs: int
    best_loss: float
    seconds: float

    @classmethod
    def of(cls, run: SeedRun, seconds: float) -> SeedResult:
        history = run.result.history
        epochs = int(history[-1].epoch) if len(history) else 0
        return cls(run.seed, bool(run.learned), epochs, float(run.best_loss), round(seconds, 3))


@dataclass(frozen=True)
class Recheck:
    """An answer retrained on recheck seeds."""

    answer: FrontierAnswer
    seeds: tuple[SeedResult, ...]

    @property
    def successes(self) -> int:
        return sum(s.learned for s in self.seeds)

    @property
    def interval(self) -> tuple[float, float]:
        return exact_interval(self.successes, len(self.seeds))

    @property
    def chance(self) -> float:
        """P(at most this many successes) were the width's true rate the required one."""
        from scipy.stats import binom

        rate = self.answer.plan.required_rate
        return float(binom.cdf(self.successes, len(self.seeds), rate))

    @property
    def holds(self) -> bool:
        return self.chance >= SHORT_OF

    def line(self) -> str:
        a, low_high = self.answer, self.interval
        stated = "/".join(map(str, a.stated_on))
        verdict = "holds up" if self.holds else "does not hold up"
        return (
            f"{a.cell.name}: {a.neurons} neurons {list(a.width.profile)} at {a.cell.budget} "
            f"epochs learn f on {self.successes}/{len(self.seeds)} recheck seeds (95% "
            f"{low_high[0]:.2f}..{low_high[1]:.2f}; stated on {stated}); "
            f"P(<= {self.successes} | {a.plan.required_rate:.0%}) = {self.chance:.3f}: {verdict}"
        )

    def to_dict(self, engine: str) -> dict[str, Any]:
        a = self.answer
        return {
            **_identity(a, engine),
            "profile": list(a.width.profile),
            "confirmation": [a.rate.successes, a.rate.seeds],
            "stated_on": list(a.stated_on),
            "successes": self.successes,
            "seeds_trained": len(self.seeds),
            "interval_95": list(self.interval),
            "chance_at_required_rate": self.chance,
            "holds": self.holds,
            "seeds": [asdict(s) for s in self.seeds],
        }


def _identity(a: FrontierAnswer, engine: str) -> dict[str, Any]:
    """What a recheck seed's result depends on: a stored seed is reused only when this agrees."""
    return {
        "study": a.cell.name,
        "neurons": a.neurons,
        "budget_epochs": a.cell.budget,
        "recipe": a.recipe.params(),
        "target_loss": a.settings.target_loss,
        "input_bits": a.settings.input_bits,
        "output_bits": a.settings.output_bits,
        "required_rate": a.plan.required_rate,
        "engine": engine,
    }


def read_answers(path: Path, studies: Sequence[str] = ()) -> list[FrontierAnswer]:
    """The answers of answers.json (those of `studies`, in that order, when given); one line
    for a file that is missing, not JSON or not answers, or a study it does not hold."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--answers: {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"--answers: cannot read {path} ({error})") from None
    if not isinstance(document, dict) or document.get("schema_version") not in READABLE_SCHEMAS:
        raise ConfigError(
            f"--answers: {path} is not a frontier answers file (schema_version {SCHEMA_VERSION})"
        )
    try:
        answers = [FrontierAnswer.from_dict(entry) for entry in document["answers"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"--answers: {path} holds an answer it cannot read ({error})") from None
    if not studies:
        return answers
    by_name = {a.cell.name: a for a in answers}
    missing = [name for name in studies if name not in by_name]
    if missing:
        raise ConfigError(
            f"--cells: {', '.join(missing)} not in {path} (it has {', '.join(by_name) or 'none'})"
        )
    return [by_name[name] for name in dict.fromkeys(studies)]


def _stored(path: Path) -> dict[tuple[str, str], dict]:
    """The rechecks already in recheck.json, by study and engine (nothing for a file from
    elsewhere)."""
    try:
        document = json.loads(path.read_text())
        return {(entry["study"], entry["engine"]): entry for entry in document["rechecks"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _worker_start() -> None:
    """A worker trains on one thread and leaves signals to its parent (which ends it)."""
    import torch

    interrupt.detach_worker()
    torch.set_num_threads(1)


def _trial(entry: dict, seeds: Sequence[int]) -> tuple[str, BooleanTrial, BooleanFunction]:
    """An answer (its answers.json entry) as a trial of its stated width and recipe on `seeds`,
    every seed trained to the end of its budget unless it reaches the target (no pruning, as a
    confirmation block); its cell's name and function with it."""
    from study.boolean_trial import BooleanTrial
    from study.data import boolean_function

    a = FrontierAnswer.from_dict(entry)  # its settings: the cell's function and required rate
    s = a.settings
    trial = BooleanTrial(
        candidate_of(a.cell, a.neurons, a.recipe), seeds, s, prune=False, decisive=False
    )
    return a.cell.name, trial, boolean_function(s.input_bits, s.function_seed, s.output_bits)


def train_seed(job: tuple[dict, int]) -> tuple[str, SeedResult]:
    """The sequential engine: train one recheck seed of an answer, in a worker."""
    from study.boolean_trial import train_seeds

    entry, seed = job
    name, trial, fn = _trial(entry, [seed])
    started = time.perf_counter()
    (run,) = train_seeds(trial, fn).outcome().runs
    return name, SeedResult.of(run, time.perf_counter() - started)


def train_population(entry: dict, seeds: Sequence[int], threads: int) -> list[SeedResult]:
    """The population engine: train recheck seeds of an answer together, in this process."""
    from study.boolean_trial import train_together

    _, trial, fn = _trial(entry, seeds)
    train_together([trial], fn, threads, watch=interrupt.check)
    return [SeedResult.of(run, run.result.seconds) for run in trial.outcome().runs]


def recheck(
    answers: Sequence[FrontierAnswer],
    out: Path,
    seeds: int = 48,
    first: int | None = None,
    processes: int = 2,
    log: Callable[[str], None] = print,
    command: str = "",
    engine: str = "sequential",
) -> list[Recheck]:
    """Retrain every answer on seeds first .. first + seeds - 1 with `engine` (`first` None:
    each answer's own, `recheck_seed`); write recheck.json (as seeds end) and recheck.md (every
    recheck stored there) in `out`; return this call's rechecks in the answers' order."""
    if engine not in RECHECK_ENGINES:
        raise ConfigError(f"--engine: {engine!r} is not one of {', '.join(RECHECK_ENGINES)}")
    path = out / "recheck.json"
    stored = _stored(path)
    done: dict[str, dict[int, SeedResult]] = {a.cell.name: {} for a in answers}
    firsts = {a.cell.name: recheck_seed(a) if first is None else first for a in answers}
    wanted = {name: range(f, f + seeds) for name, f in firsts.items()}
    for a in answers:
        entry = stored.get((a.cell.name, engine))
        if entry is not None and all(entry.get(k) == v for k, v in _identity(a, engine).items()):
            entry.setdefault("stated_on", list(a.stated_on))  # (kept since 2026-12-08)
            kept = [SeedResult(**s) for s in entry["seeds"]]
            done[a.cell.name] = {s.seed: s for s in kept}
    jobs = [
        (a.to_dict(), s)
        for a in answers
        for s in wanted[a.cell.name]
        if s not in done[a.cell.name]
    ]
    reused = len(answers) * seeds - len(jobs)
    where = f"{processes} processes" if engine == "sequential" else f"{processes} threads"
    log(
        f"recheck: {len(answers)} answers x {seeds} seeds ({_ranges(firsts, seeds)}), "
        f"{len(jobs)} to train with the {engine} engine on {where}"
        + (f", {reused} read back from {path}" if reused else "")
    )

    trained: set[str] = set()

    def results(every: bool = False) -> list[Recheck]:
        """The wanted seeds done (`every`: every seed stored too, as recheck.json keeps them)."""
        return [
            Recheck(
                a,
                tuple(
                    r
                    for s, r in sorted(done[a.cell.name].items())
                    if every or s in wanted[a.cell.name]
                ),
            )
            for a in answers
        ]

    provenance = {  # once: the commit is read with git
        "engine": engine,
        "code_commit": code_commit(),
        "torch_version": torch_version(),
        "command": command,
    }

    def save() -> None:
        # an answer this call trained seeds of (one only read back stays as it was stored)
        ours = {(r.answer.cell.name, engine): {**r.to_dict(engine), **provenance,
                                               "first_seed": firsts[r.answer.cell.name]}
                for r in results(every=True) if r.answer.cell.name in trained}  # fmt: skip
        document = {"schema_version": 1, "rechecks": list({**stored, **ours}.values())}
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(temporary, path)

    def ended(name: str, result: SeedResult, count: int) -> None:
        done[name][result.seed] = result
        trained.add(name)
        log(
            f"{name}: seed {result.seed} "
            f"{'learned f' if result.learned else 'did not learn f'} "
            f"(epoch {result.epochs}, best loss {result.best_loss:.2e}, "
            f"{result.seconds:.0f} s); {count}/{len(jobs)}"
        )

    if jobs:
        out.mkdir(parents=True, exist_ok=True)
        try:
            with interrupt.watching():
                if engine == "sequential":
                    _train_in_workers(jobs, processes, ended, save)
                else:
                    count = 0
                    for a in answers:
                        todo = [s for s in wanted[a.cell.name] if s not in done[a.cell.name]]
                        if not todo:
                            continue
                        for result in train_population(a.to_dict(), todo, processes):
                            count += 1
                            ended(a.cell.name, result, count)
                        save()
        except KeyboardInterrupt as stopped:
            stop = interrupt.stop_of(stopped) or interrupt.CTRL_C
            kept = sum(len(d) for d in done.values())
            raise interrupt.ended(stop, f"{kept} recheck seeds kept in {path}") from None
    out.mkdir(parents=True, exist_ok=True)
    save()
    (out / "recheck.md").write_text(recheck_markdown(list(_stored(path).values())))
    return results()


def recheck_seed(answer: FrontierAnswer) -> int:
    """An answer's first recheck seed by default: its cell's own recheck range under method 3
    (no stage of any cell trains on it, `answers.stage_seeds`), else `RECHECK_SEED` (above
    every seed of method 2)."""
    if answer.plan.method >= 3:
        return cell_first_seed(answer.cell.name, "recheck")
    return RECHECK_SEED


def _ranges(firsts: Mapping[str, int], seeds: int) -> str:
    """The seed ranges of a recheck, in words."""
    distinct = sorted(set(firsts.values()))
    if len(distinct) == 1:
        return f"{distinct[0]}..{distinct[0] + seeds - 1}"
    return "each cell's own recheck seeds"


def _train_in_workers(jobs, processes: int, ended, save) -> None:
    """The sequential engine: one seed per job, in single-thread worker processes; `ended` and
    `save` after every seed."""
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(min(processes, len(jobs)), initializer=_worker_start)
    try:
        results = pool.imap_unordered(train_seed, jobs)
        for count in range(1, len(jobs) + 1):
            while True:
                interrupt.check()
                try:
                    name, result = results.next(timeout=WAIT_SECONDS)
                    break
                except multiprocessing.TimeoutError:
                    continue
            ended(name, result, count)
            save()
    finally:
        pool.terminate()
        pool.join()


def recheck_markdown(entries: Sequence[dict]) -> str:
    """recheck.md: one row per recheck in recheck.json (each engine its own), and how they
    were made."""
    rows = []
    for e in sorted(entries, key=lambda e: (e["study"], e["engine"] != "sequential")):
        low, high = e["interval_95"]
        rows.append(
            {
                "cell": e["study"],
                "stated width": f"{e['neurons']} {e['profile']}",
                "budget (epochs)": e["budget_epochs"],
                "stated on": "/".join(map(str, e.get("stated_on", e["confirmation"]))),
                "engine": e["engine"],
                "recheck": f"{e['successes']}/{e['seeds_trained']}",
                "95% interval": f"{low:.2f}..{high:.2f}",
                "chance of so few at the required rate": f"{e['chance_at_required_rate']:.3f}",
                "holds up": "yes" if e["holds"] else "no",
                "median epochs (learned)": _median(e["seeds"]),
            }
        )
    firsts = sorted({e["first_seed"] for e in entries})
    lines = [
        "# Recheck of the stated widths",
        "",
        "Each stated width retrained with its own recipe and budget on seeds no run of the "
        f"frontier used ({', '.join(map(str, firsts))} onwards): by the sequential trainer (one "
        "network at a time, an engine the answers were not stated with) and, where shown, by the "
        "population engine they were stated with, every seed to the end of its budget unless it "
        "reached the target first. A width holds up unless so few successes would happen less "
        f"than {SHORT_OF:.0%} of the time at the required rate.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        "Produced by:",
        "",
        *sorted({f"- `{e['command']}`" for e in entries if e.get("command")}),
        "",
    ]
    return "\n".join(lines)


def _median(seeds: Sequence[dict]) -> str:
    """The median epoch at which the seeds that learned f reached the target."""
    values = [s["epochs"] for s in seeds if s["learned"]]
    return f"{statistics.median(values):,.0f}" if values else ""
