"""Progress bars that never become text in a rendered page.

In an interactive Jupyter kernel a bar is a widget (tqdm.notebook, needs ipywidgets); on a terminal it is tqdm's
text on stderr; in a headless notebook run (papermill, `kit run`, which sets KIT_PROGRESS=off for its kernels)
there is none: there a bar is only stderr text or a widget nobody sees, saved into the executed notebook.
KIT_PROGRESS: "auto" (default), "widget", "text" or "off".
"""
from __future__ import annotations

import importlib.util
import os
import sys

from tqdm.std import tqdm as text_tqdm

ENV = "KIT_PROGRESS"
MODES = ("auto", "widget", "text", "off")


def progress_mode() -> str:
    """The bar this process shows: "widget", "text" or "off" (see the module docstring)."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("off", "none", "0", "false", "no"):
        return "off"
    if mode in ("widget", "text"):
        return mode if mode == "text" or _has_widgets() else "off"
    if "ipykernel" in sys.modules:
        # a kernel's stderr lands in the notebook: a widget, or nothing (never tqdm's text or its TqdmWarning)
        return "widget" if _has_widgets() else "off"
    return "text"


def _has_widgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def progress_bar(total: int, desc: str, unit: str = "trial", enabled: bool = True):
    """A tqdm bar in the mode `progress_mode` picks (a disabled one when `enabled` is False or the mode is off)."""
    mode = progress_mode() if enabled else "off"
    if mode == "widget":
        from tqdm.notebook import tqdm as widget_tqdm  # imports ipywidgets: only a kernel with widgets pays for it

        return widget_tqdm(total=total, desc=desc, unit=unit, leave=True)
    return text_tqdm(total=total, desc=desc, unit=unit, disable=mode == "off", leave=True)
