"""Reports from a stored study: a pandas table of trials, a summary and matplotlib figures.

This module only reads a storage. `write_report` puts `trials.csv`, `summary.md` and PNG
figures under `results/<study>/`; the Boolean and the image report are `study.report_boolean`
and `study.report_image`, the shared tables `study.tables`.
"""

from __future__ import annotations

import json
from pathlib import Path

from study.report_boolean import boolean_figures, boolean_summary, pareto_front
from study.report_image import IMAGE_FIGURES, image_figures, image_frame, image_summary
from study.studies import load
from study.tables import markdown_table, trials_frame

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
    study, info = load(study_name, storage)
    out = Path(out_dir) if out_dir is not None else Path("results") / study_name
    out.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study)
    frame.to_csv(out / "trials.csv", index=False)
    if info.kind == "image":
        image_figures(study, frame, out)
        metrics = out / "metrics.json"  # written by `study export` into the same directory
        export = json.loads(metrics.read_text()) if metrics.is_file() else None
        (out / "summary.md").write_text(image_summary(study, frame, info, command, export))
        return out
    boolean_figures(frame, info.settings, out)
    # a certification written earlier into the same directory becomes part of the summary
    cert_path = out / "certification.md"
    certification = None
    if cert_path.is_file():
        certification = cert_path.read_text().split("\n", 1)[1]  # without its own title
    summary = boolean_summary(study, frame, info, command, certification)
    (out / "summary.md").write_text(summary)
    return out
