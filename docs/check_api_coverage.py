"""Check that the API reference lists every public name of torchcaps, and nothing else.

Usage::

    python docs/check_api_coverage.py [API_DIR]

``API_DIR`` defaults to ``docs/api``. The script reads the ``.. autosummary::`` lists of the
``.rst`` files there (resolving each entry against the ``currentmodule``/``automodule``/
``module`` in effect, as autosummary does) and compares them with the ``__all__`` lists of
:data:`MODULES`.

Each public object gets one generated page, under its *home* name: the first module of
:data:`HOME_ORDER` whose ``__all__`` has it, the subpackages before the top level (so
``torchcaps.DynamicRouting`` is documented as ``torchcaps.routing.DynamicRouting`` and
``torchcaps.squash`` as ``torchcaps.functional.squash``). Re-exports are listed too, without
a page of their own; ``docs/conf.py`` resolves references to them to the home page.

It exits with status 1 and lists the problems when

- a name of a module's ``__all__`` is not in an autosummary list on that module's page
  (a public name without docs),
- a home name is not in an autosummary list with ``:toctree:`` (no generated page), or
- an autosummary entry names something that is not public (a stale or misspelled entry).

``docs/conf.py`` runs the same check at the start of every Sphinx build and turns each problem
into a warning, so ``sphinx-build -W`` fails too.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

#: The modules whose ``__all__`` the API reference must cover.
MODULES = (
    "torchcaps",
    "torchcaps.datasets",
    "torchcaps.errors",
    "torchcaps.functional",
    "torchcaps.layers",
    "torchcaps.models",
    "torchcaps.routing",
    "torchcaps.testing",
)
#: Where a re-exported object is documented: the first of these modules that exports it.
HOME_ORDER = (*MODULES[1:], MODULES[0])  # the subpackages before the top level

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:py:)?([\w:-]+)::\s*(\S*)\s*$")
_MODULE_DIRECTIVES = {"currentmodule", "module", "automodule"}


def public_names(modules: Iterable[str] = MODULES) -> dict[str, object]:
    """Map ``module.name`` to the object for every name in each module's ``__all__``."""
    out: dict[str, object] = {}
    for modname in modules:
        module = importlib.import_module(modname)
        for name in module.__all__:
            out[f"{modname}.{name}"] = getattr(module, name)
    return out


def homes() -> dict[str, str]:
    """Map every public ``module.name`` to the name its object is documented under.

    Modules (``torchcaps.functional`` as a name of ``torchcaps``) are their own home.
    """
    public = public_names()
    out: dict[str, str] = {}
    for full, obj in public.items():
        if isinstance(obj, ModuleType):
            out[full] = full
            continue
        for modname in HOME_ORDER:
            name = full.rsplit(".", 1)[1]
            candidate = f"{modname}.{name}"
            if candidate in public and public[candidate] is obj:
                out[full] = candidate
                break
        else:  # pragma: no cover - exported under another name
            out[full] = full
    return out


def autosummary_entries(path: Path) -> list[tuple[str | None, str, int, bool]]:
    """Return ``(current module, entry, line number, has :toctree:)`` for each entry."""
    lines = path.read_text(encoding="utf-8").splitlines()
    entries: list[tuple[str | None, str, int, bool]] = []
    current: str | None = None
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, name, argument = match.groups()
        if name in _MODULE_DIRECTIVES and argument:
            current = None if argument == "None" else argument
            i += 1
            continue
        if name != "autosummary":
            i += 1
            continue
        # The directive's body: lines indented deeper than the directive (or blank).
        i += 1
        body_indent: int | None = None
        toctree = False
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                i += 1
                continue
            depth = len(line) - len(line.lstrip())
            if depth <= len(indent):
                break
            if body_indent is None:
                body_indent = depth
            text = line.strip()
            if text.startswith(":toctree:"):
                toctree = True
            elif not text.startswith(":") and not text.startswith(".."):
                entries.append((current, text.split()[0].lstrip("~"), i + 1, toctree))
            i += 1
    return entries


def _resolve(current: str | None, entry: str) -> tuple[str, object] | None:
    """Resolve an entry the way autosummary does: first under the current module."""
    candidates = [f"{current}.{entry}", entry] if current else [entry]
    for full in candidates:
        parts = full.split(".")
        for split in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for attr in parts[split:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return full, obj
    return None


def find_problems(api_dir: Path) -> list[str]:
    """Compare the autosummary lists under ``api_dir`` with the public names; list problems."""
    public = public_names()
    home = homes()
    listed: set[str] = set()  # public names listed on their module's page
    paged: set[str] = set()  # names listed with :toctree: (a generated page)
    problems: list[str] = []
    files = sorted(p for p in api_dir.rglob("*.rst") if "generated" not in p.parts)
    if not files:
        return [f"no .rst files under {api_dir}"]
    for path in files:
        for current, entry, lineno, toctree in autosummary_entries(path):
            where = f"{path.name}:{lineno}"
            resolved = _resolve(current, entry)
            if resolved is None:
                problems.append(f"{where}: autosummary entry {entry!r} does not import")
                continue
            full, obj = resolved
            # The public names of the current module that this entry stands for.
            matches = [
                name
                for name, value in public.items()
                if value is obj and name.rsplit(".", 1)[0] == current
            ]
            if full not in public and not matches:
                problems.append(
                    f"{where}: autosummary entry {full!r} is not in the __all__ of "
                    f"{', '.join(MODULES)}"
                )
                continue
            listed.update(matches)
            if full in public:
                listed.add(full)
                if toctree:
                    paged.add(full)
    for full in sorted(set(public) - listed):
        module = full.rsplit(".", 1)[0]
        problems.append(
            f"public name {full!r} is missing from the autosummary lists of the {module} page"
        )
    for full in sorted(set(home.values()) - paged):
        if not isinstance(public[full], ModuleType):
            problems.append(
                f"{full!r} has no generated page: list it in an autosummary with :toctree: "
                f"on the {full.rsplit('.', 1)[0]} page"
            )
    for full in sorted(paged - set(home.values())):
        problems.append(
            f"{full!r} has a generated page but is documented as {home[full]!r}: list it "
            "without :toctree: (two pages of one object give duplicate-object warnings)"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the check; print the problems; return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    api_dir = Path(args[0]) if args else Path(__file__).resolve().parent / "api"
    problems = find_problems(api_dir)
    if problems:
        print(f"API reference coverage: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(
        f"API reference coverage: all {len(public_names())} public names of "
        f"{', '.join(MODULES)} are documented"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
