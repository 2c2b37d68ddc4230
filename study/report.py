"""Reports from a stored study: a pandas table of trials, a summary and matplotlib figures.

This module only reads a storage. `write_report` puts `trials.csv`, `summary.md` and PNG
figures in a directory (default `results/runs/<study>/`); the Boolean and the image report
are `study.report_boolean` and `study.report_image`, the shared tables `study.tables`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from study.certify import stored_certification
from study.errors import ConfigError, StudyError
from study.report_boolean import BOOLEAN_FIGURES, boolean_figures, boolean_summary, pareto_front
from study.report_image import IMAGE_FIGURES, image_figures, image_frame, image_summary
from study.storage import default_out
from study.studies import EXPORT_ATTR, load, stored_attrs
from study.tables import markdown_table, trials_frame

REPORT_FIGURES = [name for name, _ in BOOLEAN_FIGURES + IMAGE_FIGURES]

__all__ = [
    "IMAGE_FIGURES",
    "image_frame",
    "markdown_table",
    "pareto_front",
    "trials_frame",
    "write_report",
]


def write_report(
    study_name: str,
    storage: str,
    out_dir: Path | str | None = None,
    command: str | None = None,
) -> Path:
    """Write trials.csv, summary.md and figures for a stored study; return the directory."""
    study, info = load(study_name, storage, kind=("boolean", "image"), command="report")
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    if not states["complete"] + states["pruned"]:  # before the output directory is made
        held = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trials"
        raise StudyError(f"study {study_name!r} has no finished trial to report yet ({held})")
    out = Path(out_dir) if out_dir is not None else default_out(study_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out: cannot create {out} ({error.strerror})") from None
    frame = trials_frame(study)
    frame.to_csv(out / "trials.csv", index=False)
    for stale in REPORT_FIGURES:  # figures of an earlier report in this directory
        (out / stale).unlink(missing_ok=True)
    # everything shown comes from this study's store: its trials, its stored export and
    # certification, never files lying in the output directory
    if info.kind == "image":
        figures = image_figures(study, frame, out)
        export = stored_attrs(study).get(EXPORT_ATTR)
        summary = image_summary(study, frame, info, command, export, figures)
    else:
        figures = boolean_figures(frame, info.settings, out)
        cert = stored_certification(study, info.settings)
        body = cert.body() if cert else None
        summary = boolean_summary(study, frame, info, command, body, figures)
    (out / "summary.md").write_text(summary)
    return out
