"""The private lm-eval internals this project relies on, in one place, each checked before it is used.

lm-eval has no public API for these five jobs, so the project reaches into its internals:

    yaml_function_resolver / set_yaml_function_resolver   _yaml_loader._import_func_in_yml (guards: `!function`)
    caching_lm_replaced(make)                             evaluator's use of api.model.CachingLM (request_cache)
    task_factory_class / install_task_factory             tasks._factory.TaskFactory._load_full_config and
                                                          TaskManager._factory (tasks.task_factory, catalog)
    encode_pair_texts(context, continuation)              TemplateLM._encode_pair's trailing-space rule (backend)
    register_model_lazy / MODELS_MODULE                   api.registry.model_registry (lm_eval_plugin)

Each accessor checks the shape it relies on (the attribute exists, the parameters are the ones we pass, the caller
looks the name up at call time) and raises LMEvalCompatError naming the hook, the installed lm-eval and the fix
when it moved. A version outside CHECKED_VERSIONS only warns once: the shape checks decide. tests/evals/
test_lm_eval_compat.py runs each hook through lm-eval's own code, so an upgrade that changes one fails there first.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

# lm-eval releases whose internals these hooks were read against and tested with (pyproject pins lm-eval <0.5)
CHECKED_VERSIONS = ("0.4.13",)
MODELS_MODULE = "lm_eval.models"  # importing it fills lm-eval's model registry with its own models

log = logging.getLogger(__name__)


class LMEvalCompatError(RuntimeError):
    """An lm-eval internal the project relies on is not where, or not what, it was."""


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def check_version() -> bool:
    """True when the installed lm-eval is one the hooks were checked against; else warn once and return False."""
    version = lm_eval_version()
    if version in CHECKED_VERSIONS:
        return True
    log.warning("lm-eval %s is not a version this project's lm-eval hooks were checked against (%s); each hook "
                "checks its own shape and says so if it moved (evals/harness/lm_eval_compat.py)",
                version, ", ".join(CHECKED_VERSIONS))
    return False


def _moved(hook: str, detail: str) -> LMEvalCompatError:
    return LMEvalCompatError(
        f"lm-eval {lm_eval_version()} changed {hook} ({detail}); this project was checked against lm-eval "
        f"{', '.join(CHECKED_VERSIONS)}: pip install 'lm-eval=={CHECKED_VERSIONS[-1]}', or adapt "
        f"evals/harness/lm_eval_compat.py")


def _require_params(fn: Any, names: list[str], hook: str) -> None:
    """`fn` takes the parameters `names`, in this order, as its leading parameters (self excluded)."""
    if not callable(fn):
        raise _moved(hook, "it is not a function any more")
    try:
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        raise _moved(hook, "its signature cannot be read") from None
    if params[: len(names)] != names:
        raise _moved(hook, f"its parameters are ({', '.join(params)}), not ({', '.join(names)}, ...)")


def _global_names(fn: Callable) -> set[str]:
    """Global names that `fn` and the functions defined inside it look up when they run."""
    names, todo = set(), [fn.__code__]
    while todo:
        code = todo.pop()
        names.update(code.co_names)
        todo += [c for c in code.co_consts if inspect.iscode(c)]
    return names


# ---- 1. task YAML `!function` resolution ---------------------------------------------------------------------------
YAML_HOOK = "lm_eval.tasks._yaml_loader._import_func_in_yml"


def _yaml_loader():
    check_version()
    try:
        from lm_eval.tasks import _yaml_loader
    except ImportError as err:
        raise _moved(YAML_HOOK, f"the module is gone: {err}") from None
    fn = getattr(_yaml_loader, "_import_func_in_yml", None)
    if fn is None:
        raise _moved(YAML_HOOK, "the function is gone")
    _require_params(fn, ["qual", "base_dir"], YAML_HOOK)
    ctor = getattr(_yaml_loader, "_mk_function_ctor", None)
    if ctor is None or "_import_func_in_yml" not in _global_names(ctor):
        raise _moved(YAML_HOOK, "the `!function` constructor no longer looks the resolver up by name")
    return _yaml_loader


def yaml_function_resolver() -> Callable[[str, Path], Any]:
    """The function lm-eval calls for `!function qual` in a task YAML of folder base_dir: (qual, base_dir)."""
    return _yaml_loader()._import_func_in_yml


def set_yaml_function_resolver(fn: Callable[[str, Path], Any]) -> None:
    """Make lm-eval's YAML loader call `fn(qual, base_dir)` for every `!function` it resolves."""
    _yaml_loader()._import_func_in_yml = fn


# ---- 2. the request cache simple_evaluate builds -------------------------------------------------------------------
CACHE_HOOK = "lm_eval.api.model.CachingLM (as simple_evaluate's use_cache builds it)"


def _caching_lm_module():
    check_version()
    import lm_eval.api.model as lm_model
    import lm_eval.evaluator as evaluator

    original = getattr(lm_model, "CachingLM", None)
    if not isinstance(original, type):
        raise _moved(CACHE_HOOK, "the class is gone")
    _require_params(original.__init__, ["lm", "cache_db"], CACHE_HOOK)
    for name in ("get_cache_hook", "__getattr__"):
        if not hasattr(original, name):
            raise _moved(CACHE_HOOK, f"CachingLM has no {name}")
    if "CachingLM" in vars(evaluator):  # imported by name: swapping the module attribute would not reach it
        raise _moved(CACHE_HOOK, "lm_eval.evaluator imports CachingLM by name")
    src = inspect.getsource(evaluator.simple_evaluate)
    if "lm_eval.api.model.CachingLM(" not in src:
        raise _moved(CACHE_HOOK, "simple_evaluate no longer builds lm_eval.api.model.CachingLM")
    return lm_model


@contextmanager
def caching_lm_replaced(make: Callable[[type], type]) -> Iterator[type]:
    """Within the block, simple_evaluate(use_cache=PATH) wraps the model in `make(CachingLM)` (a subclass
    taking (lm, cache_db)) instead of lm-eval's CachingLM; yields the class in use."""
    lm_model = _caching_lm_module()
    original = lm_model.CachingLM
    replacement = make(original)
    lm_model.CachingLM = replacement
    try:
        yield replacement
    finally:
        lm_model.CachingLM = original


# ---- 3. task configs as lm-eval builds tasks from them --------------------------------------------------------------
FACTORY_HOOK = "lm_eval.tasks._factory.TaskFactory._load_full_config"
MANAGER_HOOK = "lm_eval.tasks.TaskManager._factory"


def task_factory_class() -> type:
    """lm-eval's TaskFactory, checked: subclasses override `_load_full_config(entry, overrides)`, which returns a
    task's (or group's) whole config dict before lm-eval builds it, and read `self._meta`."""
    check_version()
    try:
        from lm_eval.tasks._factory import TaskFactory
    except ImportError as err:
        raise _moved(FACTORY_HOOK, f"the module is gone: {err}") from None
    _require_params(getattr(TaskFactory, "_load_full_config", None), ["entry", "overrides"], FACTORY_HOOK)
    _require_params(TaskFactory.__init__, ["meta"], FACTORY_HOOK)
    build_task = getattr(TaskFactory, "_build_task", None)
    if build_task is None or "_load_full_config" not in _global_names(build_task):
        raise _moved(FACTORY_HOOK, "TaskFactory._build_task no longer builds tasks from it")
    if "_meta" not in inspect.getsource(TaskFactory.__init__):
        raise _moved(FACTORY_HOOK, "TaskFactory keeps its metadata elsewhere than self._meta")
    return TaskFactory


def install_task_factory(task_manager: Any, factory: Any) -> Any:
    """Make `task_manager` build its tasks with `factory` (a task_factory_class() subclass); returns the manager."""
    check_version()
    current = getattr(task_manager, "_factory", None)
    if current is None or not isinstance(current, task_factory_class()):
        raise _moved(MANAGER_HOOK, "TaskManager keeps no TaskFactory in _factory")
    task_manager._factory = factory
    return task_manager


# ---- 4. how TemplateLM splits a (context, continuation) pair before encoding --------------------------------------
ENCODE_HOOK = "lm_eval.api.model.TemplateLM._encode_pair"


class _Recorder:
    """Stands in for a causal TemplateLM: records the texts _encode_pair asks to encode."""

    backend = "causal"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        self.texts.append(string)
        return []


def encode_pair_texts(context: str, continuation: str) -> list[str]:
    """The texts lm-eval's TemplateLM._encode_pair encodes for a causal model (context + continuation and the
    context, after moving the context's trailing whitespace onto the continuation), taken from lm-eval itself by
    running it on a recorder, so a backend that encodes them ahead in one batch follows lm-eval's rule exactly."""
    check_version()
    from lm_eval.api.model import TemplateLM

    fn = getattr(TemplateLM, "_encode_pair", None)
    _require_params(fn, ["context", "continuation"], ENCODE_HOOK)
    rec = _Recorder()
    fn(rec, context, continuation)
    return rec.texts


# ---- 5. the model registry ------------------------------------------------------------------------------------------
REGISTRY_HOOK = "lm_eval.api.registry.model_registry"


def register_model_lazy(name: str, target: str) -> None:
    """Register model `name` as a lazy "module:Class" placeholder (imported when `--model name` is used)."""
    check_version()
    from lm_eval.api import registry

    reg = getattr(registry, "model_registry", None)
    if reg is None or not hasattr(reg, "register") or not hasattr(reg, "__contains__"):
        raise _moved(REGISTRY_HOOK, "there is no model_registry with register()")
    if name in reg:
        return
    try:
        reg.register(name, target=target)
    except TypeError as err:
        raise _moved(REGISTRY_HOOK, f"register(name, target=...) failed: {err}") from None
