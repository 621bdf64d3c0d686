"""Sphinx configuration of the torchcaps documentation.

Build (offline, warnings are errors):

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest

Cross-references to the Python and PyTorch documentation (intersphinx) need their object
inventories. The build never downloads them unless ``TORCHCAPS_DOCS_ONLINE=1`` is set; an
inventory saved as ``docs/_inventories/<name>.inv`` (``python.inv``, ``torch.inv``) is used
offline. References into a project without an inventory are listed in ``nitpick_ignore_regex``
so that ``nitpicky = True`` still checks every reference into torchcaps itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torchcaps

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))  # for check_api_coverage

import check_api_coverage  # noqa: E402

# -- Project -----------------------------------------------------------------------------------
project = "torchcaps"
author = "The torchcaps developers"
copyright = "The torchcaps developers"
release = torchcaps.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_parser",  # Markdown pages: CHANGELOG.md and results.md
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store", "requirements.txt"]

# Every cross-reference must resolve (to torchcaps, or to an inventory that is loaded).
nitpicky = True

# -- autodoc / autosummary / napoleon ----------------------------------------------------------
autosummary_generate = True
autosummary_generate_overwrite = True
autodoc_member_order = "bysource"
# Types in the signature, from the annotations (they are evaluated there, so the aliases of
# ``from __future__ import annotations`` code are expanded; in "description" mode they are not).
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
python_use_unqualified_type_names = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = ["Shape"]

# -- doctest -----------------------------------------------------------------------------------
# Runs the ``testcode``/``doctest`` blocks of the pages *and* the ``>>>`` examples of every
# docstring pulled in by autodoc.
doctest_global_setup = """
import torch
torch.manual_seed(0)
"""
doctest_test_doctest_blocks = "default"

# -- intersphinx (offline unless asked) --------------------------------------------------------
_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "torch": "https://docs.pytorch.org/docs/stable",
}
_ONLINE = os.environ.get("TORCHCAPS_DOCS_ONLINE", "") == "1"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
for _name, _url in _INVENTORIES.items():
    _local = DOCS / "_inventories" / f"{_name}.inv"
    if _local.is_file():
        intersphinx_mapping[_name] = (_url, str(_local))
    elif _ONLINE:
        intersphinx_mapping[_name] = (_url, None)
intersphinx_timeout = 10

# References that cannot resolve without the matching inventory. Everything under
# ``torchcaps`` is still checked.
nitpick_ignore_regex = [
    # PyTorch's objects (torch.Tensor, torch.nn.Module, torch.device, torch.autocast, ...).
    # Ignored even with torch's inventory: autodoc names some by their private paths
    # (``torch.nn.modules.module.Module``), which the inventory does not list.
    (r"py:.*", r"torch(\..*)?"),
]
if "python" not in intersphinx_mapping:
    # Standard-library types in signatures, e.g. ``collections.abc.Sequence``, ``pathlib.Path``.
    nitpick_ignore_regex.append((r"py:.*", r"(collections\.abc|typing|contextlib|pathlib)\..*"))

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"torchcaps {release}"
html_short_title = "torchcaps"
html_theme_options = {
    "source_repository": "https://github.com/torchcaps/torchcaps/",
    "source_branch": "main",
    "source_directory": "docs/",
}
html_show_sourcelink = False

# -- Math: MathJax shipped with the docs, so the formulas render offline -----------------------
# Sphinx's default loads MathJax from a CDN: without a network every formula stayed raw LaTeX.
# docs/_static/mathjax/ holds one self-contained MathJax 3 file (TeX input with all extensions,
# SVG output with its fonts; provenance and update steps in MathJax-README.txt there), which
# html_static_path copies into _static/ of the HTML.
_MATHJAX = DOCS / "_static" / "mathjax" / "tex-svg-full.js"
if not _MATHJAX.is_file():
    raise FileNotFoundError(f"{_MATHJAX} is missing; see docs/_static/mathjax/MathJax-README.txt")
html_static_path = [str(_MATHJAX.parent.relative_to(DOCS))]
mathjax_path = _MATHJAX.name  # relative to _static/
# The delimiters Sphinx writes around :math: and .. math:: (mathjax_inline, mathjax_display),
# and no others. myst-parser adds its processHtmlClass option to this dict.
mathjax3_config = {"tex": {"inlineMath": [[r"\(", r"\)"]], "displayMath": [[r"\[", r"\]"]]}}

# -- MyST --------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3


# -- Hooks -------------------------------------------------------------------------------------
# Public names re-exported from another module (``torchcaps.DynamicRouting``) are documented once,
# under their home name (``torchcaps.routing.DynamicRouting``); see check_api_coverage.homes().
_HOMES = check_api_coverage.homes()
_HOMES_BY_SHORT_NAME: dict[str, set[str]] = {}
for _full, _home in _HOMES.items():
    _HOMES_BY_SHORT_NAME.setdefault(_full.rsplit(".", 1)[1], set()).add(_home)


def _check_api_coverage(app):
    """Warn (an error under ``-W``) when a public name is missing from the API reference."""
    from sphinx.util import logging

    logger = logging.getLogger("torchcaps.api_coverage")
    for problem in check_api_coverage.find_problems(DOCS / "api"):
        logger.warning("API reference: %s", problem)


def _resolve_reexport(app, env, node, contnode):
    """Resolve a reference to a re-export (``torchcaps.Routing``) to its documented home.

    Also resolves a bare name (``assert_routing_contract``) used in a docstring outside its own
    module when it names exactly one public object.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module = node.get("py:module")
    candidates = [f"{module}.{target}", target] if module else [target]
    home = next((_HOMES[c] for c in candidates if c in _HOMES), None)
    if home is None and "." not in target:
        matches = _HOMES_BY_SHORT_NAME.get(target, set())
        home = next(iter(matches)) if len(matches) == 1 else None
    if home is None or home == target:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], home, node, contnode
    )


def _process_docstring(app, what, name, obj, options, lines):
    """Replace the docstring a plain value inherits from its type (``str.__doc__``)."""
    if name.endswith(".__version__"):
        lines[:] = [
            "The version of torchcaps, a :pep:`440` string such as ``0.1.0``; the single",
            "source of the version (the package metadata reads it from here).",
        ]
    elif what == "data" and lines and type(obj).__doc__ and lines[0] in type(obj).__doc__:
        lines[:] = []


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    """Show ``Routing()`` rather than the ``(*args, **kwargs)`` of ``nn.Module.__init__``."""
    import torch

    if what == "class" and getattr(obj, "__init__", None) is torch.nn.Module.__init__:
        return "()", return_annotation
    return None


def _skip_member(app, what, name, obj, skip, options):
    """Leave out ``extra_repr``: it only shapes ``print(module)``."""
    if name == "extra_repr":
        return True
    return None


def setup(app):
    app.connect("builder-inited", _check_api_coverage)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-signature", _process_signature)
