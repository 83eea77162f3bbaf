"""A report a person reads beside a plan file: Markdown tables and one PNG figure.

`write_report(plan, md_path, png_path)` writes both. The Markdown (`markdown.py`) says what the plan
is and why (summary, explanation, stages, mesh, op partitions, memory, step time, runners-up) and
embeds the PNG (`figure.py`), which shows three panels: which layers sit on which devices, memory
per device against the limit, and a Gantt chart of the pipeline schedule simulated by
`compiler/schedule.py`.

Only `Plan`'s required fields are relied on. These optional `plan.predicted` keys are used when
present (the cost model may or may not fill them):

  memory_breakdown_gib  list, one dict per plan device, component name -> GiB
                        (e.g. params, grads, optimizer, activations, buffers)
  breakdown_s           dict, part of the step name -> seconds
  stage_times_s         list, one dict per stage: {"forward": s, "backward": s} for one micro-batch
  step_time_s, tokens_per_s, mfu   numbers (mfu as a fraction, 0.42 = 42 %)
"""

import os

from compiler.plan import Plan
from compiler.report.figure import render_png
from compiler.report.markdown import render_markdown

__all__ = ["write_report", "render_markdown", "render_png"]


def write_report(plan: Plan, md_path: str, png_path: str) -> None:
    """Write the Markdown report to `md_path` and its figure to `png_path` (usually beside the plan)."""
    for path in (md_path, png_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    render_png(plan, png_path)
    # The Markdown links the figure relative to itself, so the pair can be moved together.
    png_name = os.path.relpath(os.path.abspath(png_path), os.path.dirname(os.path.abspath(md_path)))
    tmp = f"{md_path}.tmp"
    with open(tmp, "w") as f:
        f.write(render_markdown(plan, png_name.replace(os.sep, "/")))
    os.replace(tmp, md_path)  # a reader never sees half a file
