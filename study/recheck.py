"""Recheck published frontier answers: retrain each stated width, with its recipe and budget, on
seeds no run of the frontier used, with the sequential trainer (`study.trainer`, one network
at a time; the frontier stated its answers with the population engine), and say whether it
holds up.

`study frontier recheck` reads only answers.json, so anyone with the file can run it. Every
seed trains to the end of its budget unless it reaches the target first (no pruning, as in a
confirmation block); a seed counts when it learns f (the target loss with every bit right).
Each answer gets its rate on those seeds, the exact 95% interval, and the chance of so few
successes were its true rate the required one (below 5%: it does not hold up).

Seeds are written to recheck.json as they end; a rerun with the same answers and seeds reads
them back, so a long recheck resumes. Seeds train in worker processes of one thread each (on
two cores, two single-thread processes beat one process with two threads on these tiny nets).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from study import interrupt
from study.config import RECHECK_SEED
from study.errors import ConfigError
from study.frontier import (
    SCHEMA_VERSION,
    FrontierAnswer,
    candidate_of,
    code_commit,
    exact_interval,
    torch_version,
)
from study.tables import markdown_table

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
        confirmed = f"{a.rate.successes}/{a.rate.seeds}"
        verdict = "holds up" if self.holds else "does not hold up"
        return (
            f"{a.cell.name}: {a.neurons} neurons {list(a.width.profile)} at {a.cell.budget} "
            f"epochs learn f on {self.successes}/{len(self.seeds)} recheck seeds (95% "
            f"{low_high[0]:.2f}..{low_high[1]:.2f}; confirmed {confirmed}); "
            f"P(<= {self.successes} | {a.plan.required_rate:.0%}) = {self.chance:.3f}: {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        a = self.answer
        return {
            **_identity(a),
            "profile": list(a.width.profile),
            "confirmation": [a.rate.successes, a.rate.seeds],
            "successes": self.successes,
            "seeds_trained": len(self.seeds),
            "interval_95": list(self.interval),
            "chance_at_required_rate": self.chance,
            "holds": self.holds,
            "seeds": [asdict(s) for s in self.seeds],
        }


def _identity(a: FrontierAnswer) -> dict[str, Any]:
    """What a recheck seed's result depends on: a stored seed is reused only when this agrees."""
    return {
        "study": a.cell.name,
        "neurons": a.neurons,
        "budget_epochs": a.cell.budget,
        "recipe": a.recipe.params(),
        "target_loss": a.settings.target_loss,
        "input_bits": a.settings.input_bits,
        "output_bits": a.settings.output_bits,
        "engine": "sequential",
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
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
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


def _stored(path: Path) -> dict[str, dict]:
    """The rechecks already in recheck.json, by study (nothing for a file from elsewhere)."""
    try:
        document = json.loads(path.read_text())
        return {entry["study"]: entry for entry in document["rechecks"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _worker_start() -> None:
    """A worker trains on one thread and leaves signals to its parent (which ends it)."""
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_seed(job: tuple[dict, int]) -> tuple[str, SeedResult]:
    """Train one recheck seed of an answer (given as its answers.json entry)."""
    from study.boolean_trial import BooleanTrial, train_seeds
    from study.data import boolean_function

    entry, seed = job
    a = FrontierAnswer.from_dict(entry)
    settings = replace(
        a.settings, function_seed=a.cell.function_seed, required_share=a.plan.required_rate
    )
    fn = boolean_function(settings.input_bits, a.cell.function_seed, settings.output_bits)
    trial = BooleanTrial(
        candidate_of(a.cell, a.neurons, a.recipe), [seed], settings, prune=False, decisive=False
    )
    started = time.perf_counter()
    run = train_seeds(trial, fn).outcome().runs[0]
    history = run.result.history
    return a.cell.name, SeedResult(
        seed,
        bool(run.learned),
        int(history[-1].epoch) if len(history) else 0,
        float(run.best_loss),
        round(time.perf_counter() - started, 3),
    )


def recheck(
    answers: Sequence[FrontierAnswer],
    out: Path,
    seeds: int = 48,
    first: int = RECHECK_SEED,
    processes: int = 2,
    log: Callable[[str], None] = print,
    command: str = "",
) -> list[Recheck]:
    """Retrain every answer on seeds first .. first + seeds - 1; write recheck.json (after every
    seed) and recheck.md in `out`; return the rechecks in the answers' order."""
    path = out / "recheck.json"
    stored = _stored(path)
    done: dict[str, dict[int, SeedResult]] = {a.cell.name: {} for a in answers}
    wanted = range(first, first + seeds)
    for a in answers:
        entry = stored.get(a.cell.name)
        if entry is not None and all(entry.get(k) == v for k, v in _identity(a).items()):
            kept = [SeedResult(**s) for s in entry["seeds"] if s["seed"] in wanted]
            done[a.cell.name] = {s.seed: s for s in kept}
    jobs = [(a.to_dict(), s) for a in answers for s in wanted if s not in done[a.cell.name]]
    reused = len(answers) * seeds - len(jobs)
    log(
        f"recheck: {len(answers)} answers x {seeds} seeds ({first}..{first + seeds - 1}), "
        f"{len(jobs)} to train on {processes} processes"
        + (f", {reused} read back from {path}" if reused else "")
    )

    def results() -> list[Recheck]:
        return [
            Recheck(a, tuple(done[a.cell.name][s] for s in wanted if s in done[a.cell.name]))
            for a in answers
        ]

    def save() -> None:
        others = {k: v for k, v in stored.items() if k not in done}
        document = {
            "schema_version": 1,
            "first_seed": first,
            "code_commit": code_commit(),
            "torch_version": torch_version(),
            "command": command,
            "rechecks": [*others.values(), *(r.to_dict() for r in results() if r.seeds)],
        }
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(temporary, path)

    if jobs:
        out.mkdir(parents=True, exist_ok=True)
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(min(processes, len(jobs)), initializer=_worker_start)
        try:
            with interrupt.watching():
                ended = pool.imap_unordered(train_seed, jobs)
                for count in range(1, len(jobs) + 1):
                    while True:
                        interrupt.check()
                        try:
                            name, result = ended.next(timeout=WAIT_SECONDS)
                            break
                        except multiprocessing.TimeoutError:
                            continue
                    done[name][result.seed] = result
                    save()
                    log(
                        f"{name}: seed {result.seed} "
                        f"{'learned f' if result.learned else 'did not learn f'} "
                        f"(epoch {result.epochs}, best loss {result.best_loss:.2e}, "
                        f"{result.seconds:.0f} s); {count}/{len(jobs)}"
                    )
        except KeyboardInterrupt as stopped:
            stop = interrupt.stop_of(stopped) or interrupt.CTRL_C
            kept = sum(len(d) for d in done.values())
            raise interrupt.Stopped(
                stop, f"{stop.words}: {kept} recheck seeds kept in {path}; run it again to resume"
            ) from None
        finally:
            pool.terminate()
            pool.join()
    out.mkdir(parents=True, exist_ok=True)
    save()
    rechecks = results()
    (out / "recheck.md").write_text(recheck_markdown(rechecks, first, command))
    return rechecks


def recheck_markdown(rechecks: Sequence[Recheck], first: int, command: str = "") -> str:
    """recheck.md: one row per answer, and how the rechecks were made."""
    rows = []
    for r in rechecks:
        a, (low, high) = r.answer, r.interval
        rows.append(
            {
                "cell": a.cell.name,
                "stated width": f"{a.neurons} {list(a.width.profile)}",
                "budget (epochs)": a.cell.budget,
                "confirmed": f"{a.rate.successes}/{a.rate.seeds}",
                "recheck": f"{r.successes}/{len(r.seeds)}",
                "95% interval": f"{low:.2f}..{high:.2f}",
                f"chance of so few at {a.plan.required_rate:.0%}": f"{r.chance:.3f}",
                "holds up": "yes" if r.holds else "no",
                "median epochs (learned)": _median([s.epochs for s in r.seeds if s.learned]),
            }
        )
    lines = [
        "# Recheck of the stated widths",
        "",
        "Each stated width retrained with its own recipe and budget on seeds no run of the "
        f"frontier used ({first} onwards), by the sequential trainer (one network at a time; "
        "the answers were stated with the population engine), every seed to the end of its "
        "budget unless it reached the target first. A width holds up unless so few successes "
        f"would happen less than {SHORT_OF:.0%} of the time at the required rate.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]
    if command:
        lines += [f"Produced by: `{command}`", ""]
    return "\n".join(lines)


def _median(values: Sequence[int]) -> str:
    return f"{statistics.median(values):,.0f}" if values else ""
