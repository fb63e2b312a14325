"""A user's components, with no edit of the toolkit: `--plugin PATH_OR_MODULE` (repeatable; in both
training scripts, wt_load.py, token_cache.py, and a --config file's `plugin` list) imports a Python
file or module whose top level registers components, before the command line is built, so their
names and settings are flags like the built-ins'.

    python pretraining_advanced.py --plugin my_lion.py --optimizer lion --lion_beta2 0.98

The rules, one for every kind of component:
- only what the user names on the command line (or in their --config file) is imported: nothing is
  ever imported because a run folder, a checkpoint or a cache names it, so a folder from elsewhere
  stays inert;
- a plugin that fails to import, or registers a name that exists, is one `error:` line, and what it
  registered before failing is taken back;
- a run records its plugins (path and sha256) in run.json and its checkpoints; --resume needs the same
  plugins given again, unchanged, and refuses in one line otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from gptkit.errors import UserError
from gptkit.files import sha256_file
from gptkit.registry import ALL


@dataclass(frozen=True)
class Plugin:
    name: str  # as given: a path or a module name
    path: str | None  # the file imported (a module's own file), absolute
    sha256: str | None  # of that file: a changed plugin is refused on resume

    def record(self) -> dict:
        return asdict(self)


_LOADED: dict[str, Plugin] = {}  # by absolute path (or module name): a plugin is imported once per process


def is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec or Path(spec).is_file()


def load_plugin(spec: str) -> Plugin:
    """Import one plugin (a .py file or a module name) once; one error line if it cannot be."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("--plugin needs a Python file or module name")
    if is_file_spec(spec):
        return _load_file(spec)
    return _load_module(spec)


def _load_file(spec: str) -> Plugin:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--plugin {spec}: no such file")
    digest = sha256_file(path)
    known = _LOADED.get(str(path))
    if known is not None:
        if known.sha256 != digest:
            raise UserError(f"--plugin {spec} changed since this process imported it; start a new process")
        return known
    name = f"gptkit_plugin_{digest[:12]}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--plugin {spec} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    _guarded(spec, lambda: (sys.modules.__setitem__(name, module), module_spec.loader.exec_module(module)),
             undo=lambda: sys.modules.pop(name, None))
    plugin = Plugin(spec, str(path), digest)
    _LOADED[str(path)] = plugin
    return plugin


def _load_module(spec: str) -> Plugin:
    known = _LOADED.get(spec)
    if known is not None:
        return known
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UserError(f"--plugin {spec}: no such file or module (a file needs its path, e.g. ./{spec}.py)")
    module = _guarded(spec, lambda: importlib.import_module(spec), undo=lambda: sys.modules.pop(spec, None))
    path = getattr(module, "__file__", None)
    plugin = Plugin(spec, str(Path(path).resolve()) if path else None, sha256_file(path) if path else None)
    _LOADED[spec] = plugin
    return plugin


def _guarded(spec: str, run, undo):
    """Run a plugin's import; on any failure take back what it registered and say why in one line."""
    before = [(registry, dict(registry)) for registry in ALL]
    try:
        return run()
    except BaseException as e:
        undo()
        for registry, items in before:
            registry.clear()
            registry.update(items)
        if isinstance(e, KeyboardInterrupt):
            raise
        if isinstance(e, UserError):
            raise UserError(f"--plugin {spec}: {e}") from None
        raise UserError(f"--plugin {spec} failed to import: {type(e).__name__}: {str(e).strip()[:200]}"
                        f"{_where(e, spec)}") from None


def _where(e: BaseException, spec: str) -> str:
    """' (FILE line N)' of the innermost frame in the plugin's own file, if any."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).name == Path(spec).name]
    if isinstance(e, SyntaxError) and e.lineno:
        return f" (line {e.lineno})"
    return f" (line {frames[-1].lineno})" if frames else ""


def load_plugins(specs) -> list[Plugin]:
    return [load_plugin(s) for s in specs or ()]


def add_plugin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                   help="import a Python file or module that registers components (an optimizer, schedule, metric, "
                        "block part, evaluation, data source or file format) before the flags are read; repeatable. "
                        "A resumed run needs the same plugins, unchanged")


def preload(argv) -> list[Plugin]:
    """The plugins a command line names (its --plugin flags, then its --config file's `plugin` list),
    imported before its parser is built, so their components are choices and flags of it."""
    from gptkit.config import read_config_file

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--config", default=None)
    known, _ = p.parse_known_args(list(argv) if argv is not None else sys.argv[1:])
    specs = list(known.plugin)
    if known.config:
        from_file = read_config_file(known.config).get("plugin") or []
        specs = [s for s in (from_file if isinstance(from_file, list) else [from_file]) if s not in specs] + specs
    return load_plugins(specs)


def check_same_plugins(recorded, loaded: list[Plugin], what: str = "the checkpoint") -> None:
    """--resume: every plugin the run was trained with is given again, with the same content."""
    have = {}
    for p in loaded:
        have[p.name] = p
        if p.path:
            have[p.path] = p
    for rec in recorded or []:
        mine = have.get(rec.get("path")) or have.get(rec.get("name"))
        if mine is None:
            raise UserError(f"{what} was trained with --plugin {rec.get('name')}; give it again (the same file) to "
                            "resume")
        if rec.get("sha256") and mine.sha256 != rec.get("sha256"):
            raise UserError(f"--plugin {rec.get('name')} has changed since {what} was written (sha256 "
                            f"{str(rec.get('sha256'))[:12]}..., now {str(mine.sha256)[:12]}...); restore it, or "
                            "start a new run")
