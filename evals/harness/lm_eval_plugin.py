"""Make `lm_eval --model gdn2` work: lm-eval 0.4.x finds models only in its own registry (no plugin entry points).

`python run_eval.py lm-eval-plugin install` writes a one-line .pth file into site-packages that imports this module
at interpreter start. It does nothing then but wait for `lm_eval.models` (lm-eval's own model table) to be
imported, and registers "gdn2" next to them as a lazy placeholder ("evals.harness.backend:GDN2LM"), so no torch import
happens unless the model is used. (Hooking the registry module itself would leave it non-empty too early, and
lm-eval then skips importing its own models.)
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

from evals.harness.lm_eval_compat import MODELS_MODULE  # standard library imports only: fine at interpreter start

PTH_NAME = "gdn2_eval_lm_eval_plugin.pth"
TARGET = "evals.harness.backend:GDN2LM"


def register() -> None:
    from evals.harness.lm_eval_compat import register_model_lazy

    register_model_lazy("gdn2", TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Lets the normal import of lm_eval.models run, then adds our model to the registry."""

    name = MODELS_MODULE

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_and_register
        return spec


def activate() -> None:
    """Called from the .pth file: register now if lm-eval is already imported, else when it is."""
    if MODELS_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def pth_line() -> str:
    # site.py executes .pth lines that start with "import"; a missing or foreign `evals` must stay silent
    body = ("try:\n    from evals.harness import lm_eval_plugin\n    lm_eval_plugin.activate()\n"
            "except Exception:\n    pass")
    return f"import sys; exec({body!r})\n"


def install(site_dir: str | None = None) -> Path:
    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(pth_line())
    return path


def uninstall(site_dir: str | None = None) -> Path:
    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.unlink(missing_ok=True)
    return path
