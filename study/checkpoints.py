"""Checkpoints of image trials stopped by a time budget, kept in the store's artifacts.

A trial that the time budget stops at an epoch boundary saves its training state (the
trainer's snapshot: weights, optimiser, schedule, weight average, random generators, history)
as an Optuna artifact of that trial and names it in its user attribute `checkpoint`. The
trial is then failed and re-queued with its parameters; the WAITING copy carries the same
attribute, so that whichever run claims it next goes on after the saved epoch, exactly as the
stopped run would have gone on (`trainer.train(resume=...)`), instead of starting again. The
file is removed once the trial that resumed it has finished. A checkpoint that cannot be read
(its file removed by hand) is said in the trial (`checkpoint_lost`) and the trial trains from
its first epoch.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import optuna
import torch

from study.errors import first_line
from study.storage import artifact_store

CHECKPOINT_ATTR = "checkpoint"
"""Trial user attribute: {"artifact": id, "epoch": the last epoch it holds}."""


def save(storage: str, trial: optuna.Trial, state: dict) -> None:
    """Store `state` as an artifact of `trial` and name it on the trial."""
    from optuna.artifacts import upload_artifact

    store = artifact_store(storage)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"checkpoint-trial-{trial.number}-epoch-{state['epoch']}.pt"
        torch.save(state, path)
        artifact = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
    trial.set_user_attr(CHECKPOINT_ATTR, {"artifact": artifact, "epoch": state["epoch"]})


def load(storage: str | None, trial: optuna.Trial) -> tuple[dict | None, str | None]:
    """The checkpoint `trial` carries and its artifact id, or (None, None)."""
    from optuna.artifacts import download_artifact

    record = trial.user_attrs.get(CHECKPOINT_ATTR)
    if not record or storage is None:
        return None, None
    store = artifact_store(storage, create=False)
    try:
        if store is None:
            raise FileNotFoundError("the store has no artifacts")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "checkpoint.pt"
            download_artifact(
                artifact_store=store, file_path=str(path), artifact_id=record["artifact"]
            )
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # removed or damaged: the trial starts from its first epoch
        trial.set_user_attr("checkpoint_lost", f"{type(error).__name__}: {first_line(error)}")
        trial.set_user_attr(CHECKPOINT_ATTR, None)
        return None, None
    return state, record["artifact"]


def discard(storage: str | None, artifact: str | None) -> None:
    """Remove a checkpoint's file (its trial went on from it and finished, or was stopped
    again and saved a newer one)."""
    if storage is None or artifact is None:
        return
    store = artifact_store(storage, create=False)
    if store is not None:
        with contextlib.suppress(Exception):  # already gone
            store.remove(artifact)
