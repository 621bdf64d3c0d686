"""The release plumbing parses and says what CONTRIBUTING's release checklist relies on.

Nothing can be published from a test, so these tests read the files instead: the CI workflow runs
``.ci/run``; the release workflow builds on a version tag, checks the tag against the package
version (its shell steps are run here) and publishes with PyPI trusted publishing, with no
password or token anywhere; Read the Docs builds docs/conf.py with the ``docs`` extra and a
CPU build of the PyTorch that CI uses. These files belong to the repository, not to the package:
outside a git checkout (an unpacked sdist) the module is skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from _helpers import ROOT

if not (ROOT / ".git").exists():
    pytest.skip("not a git checkout: no release files", allow_module_level=True)

WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
RELEASE = WORKFLOWS / "release.yml"
RTD = ROOT / ".readthedocs.yaml"
VERSION = runpy.run_path(str(ROOT / "src" / "torchcaps" / "_version.py"))["__version__"]


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def _triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the bare key ``on`` as the boolean True.
    on = workflow.get("on", workflow.get(True))
    assert isinstance(on, dict), f"the triggers must be a mapping, got {on!r}"
    return on


def _steps(workflow: dict[str, Any], job: str) -> list[dict[str, Any]]:
    return workflow["jobs"][job]["steps"]


def _step_using(steps: list[dict[str, Any]], action: str) -> dict[str, Any]:
    found = [s for s in steps if s.get("uses", "").split("@")[0] == action]
    assert len(found) == 1, f"expected one step using {action}, found {len(found)}"
    return found[0]


def _runs(steps: list[dict[str, Any]]) -> list[str]:
    return [line.strip() for s in steps for line in s.get("run", "").splitlines()]


def _walk(node: Any, path: str = ""):
    """Yield (path, key, value) for every mapping entry in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}[{i}]")


def _run_step(step: dict[str, Any], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a workflow step's script as GitHub runs a ``shell: bash`` step."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    assert step.get("shell") == "bash", "run the step with shell: bash (-eo pipefail)"
    assert "${{" not in step["run"], "pass values through env, not ${{ }} inside the script"
    # ``python`` on PATH is this interpreter, as setup-python's is on the runner.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        cwd=cwd,
        env={"PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- CI --------------------------------------------------------------------------------------------


def test_ci_runs_the_ci_script_on_pushes_to_main_and_on_pull_requests() -> None:
    ci = _load(CI)
    on = _triggers(ci)
    assert on["push"]["branches"] == ["main"]
    assert "pull_request" in on
    assert ci["concurrency"]["group"]
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert 0 < job["timeout-minutes"] <= 90  # CI's budget for .ci/run is 90 minutes
    setup = _step_using(job["steps"], "actions/setup-python")
    assert setup["with"]["python-version"] == "3.11"  # a string: 3.10 as a float is 3.1
    assert "bash .ci/run" in _runs(job["steps"])


def test_ci_script_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.endswith("&& .venv/bin/pytest")]
    assert len(commands) == 1, "the README has one test command"
    # In a subshell: under set -e, a failed install before the last '&&' would not stop CI.
    assert f"({commands[0]})" in (ROOT / ".ci" / "run").read_text().splitlines()


# -- release -------------------------------------------------------------------------------------


def test_release_runs_on_version_tags_only() -> None:
    on = _triggers(_load(RELEASE))
    assert on == {"push": {"tags": ["v*"]}}


def test_release_build_makes_and_checks_the_sdist_and_wheel() -> None:
    steps = _steps(_load(RELEASE), "build")
    assert _step_using(steps, "actions/setup-python")["with"]["python-version"] == "3.11"
    runs = _runs(steps)
    assert "python -m pip install build twine" in runs
    build = runs.index("python -m build")
    assert runs.index("twine check --strict dist/*") > build
    upload = _step_using(steps, "actions/upload-artifact")
    assert upload["with"]["path"].rstrip("/") == "dist"
    assert upload["with"]["if-no-files-found"] == "error"


def _tag_check(steps: list[dict[str, Any]]) -> dict[str, Any]:
    found = [s for s in steps if "_version.py" in s.get("run", "")]
    assert len(found) == 1, "one build step compares the tag with _version.py"
    return found[0]


def test_release_build_checks_the_tag_before_building(tmp_path: Path) -> None:
    steps = _steps(_load(RELEASE), "build")
    check = _tag_check(steps)
    assert steps.index(check) < [s.get("run") for s in steps].index("python -m build")

    github_env = tmp_path / "github_env"
    ok = _run_step(check, ROOT, {"GITHUB_REF_NAME": f"v{VERSION}", "GITHUB_ENV": str(github_env)})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert github_env.read_text().splitlines() == [f"VERSION={VERSION}"]

    for tag in (VERSION, f"v{VERSION}.post1", "v9999.0.0"):
        bad = _run_step(check, ROOT, {"GITHUB_REF_NAME": tag, "GITHUB_ENV": str(github_env)})
        assert bad.returncode != 0, f"tag {tag!r} passed for version {VERSION}"
        assert f"expected the tag v{VERSION}" in bad.stdout


def test_release_build_checks_what_dist_holds(tmp_path: Path) -> None:
    steps = _steps(_load(RELEASE), "build")
    (check,) = [s for s in steps if "dist/" in s.get("run", "") and "VERSION" in s["run"]]
    assert steps.index(check) > [s.get("run") for s in steps].index("python -m build")

    def dist_with(*names: str) -> Path:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        (folder / "dist").mkdir(parents=True)
        for name in names:
            (folder / "dist" / name).write_bytes(b"")
        return folder

    sdist, wheel = f"torchcaps-{VERSION}.tar.gz", f"torchcaps-{VERSION}-py3-none-any.whl"
    env = {"VERSION": VERSION}
    assert _run_step(check, dist_with(sdist, wheel), env).returncode == 0
    assert _run_step(check, dist_with(sdist), env).returncode != 0
    assert _run_step(check, dist_with(sdist, wheel, "torchcaps-0.0.1.tar.gz"), env).returncode != 0
    old = ("torchcaps-0.0.1.tar.gz", "torchcaps-0.0.1-py3-none-any.whl")
    assert _run_step(check, dist_with(*old), env).returncode != 0


def test_release_publishes_the_built_files_with_trusted_publishing() -> None:
    release = _load(RELEASE)
    assert release["permissions"] == {"contents": "read"}
    assert "permissions" not in release["jobs"]["build"]  # no id-token for the build
    publish = release["jobs"]["publish"]
    assert publish["needs"] in ("build", ["build"])
    assert publish["environment"] == {"name": "pypi", "url": "https://pypi.org/p/torchcaps"}
    assert publish["permissions"] == {"id-token": "write", "contents": "read"}

    download = _step_using(publish["steps"], "actions/download-artifact")
    upload = _step_using(_steps(release, "build"), "actions/upload-artifact")
    assert download["with"]["name"] == upload["with"]["name"]
    assert download["with"]["path"].rstrip("/") == "dist"

    pypi = _step_using(publish["steps"], "pypa/gh-action-pypi-publish")
    assert pypi["uses"] == "pypa/gh-action-pypi-publish@release/v1"
    assert publish["steps"].index(pypi) > publish["steps"].index(download)
    # Trusted publishing: no credentials as inputs, and the default dist/ as the source.
    assert not set(pypi.get("with", {})) & {"user", "password", "api-token", "packages-dir"}


@pytest.mark.parametrize("path", [CI, RELEASE], ids=lambda p: p.name)
def test_workflows_hold_no_credentials(path: Path) -> None:
    text = yaml.safe_dump(_load(path))  # the content, without the comments
    assert "secrets." not in text
    assert not re.search(r"password|api[-_]?token|GITHUB_TOKEN|github\.token", text, re.I)
    for where, key, _ in _walk(_load(path)):
        assert not re.search(r"password|token|secret", str(key), re.I) or key == "id-token", (
            f"{path.name}: {where}/{key}"
        )


@pytest.mark.parametrize("path", [CI, RELEASE], ids=lambda p: p.name)
def test_workflow_actions_are_pinned_to_a_major_version(path: Path) -> None:
    uses = [value for _, key, value in _walk(_load(path)) if key == "uses"]
    assert uses
    for action in uses:
        assert re.fullmatch(r"[\w-]+/[\w-]+@(v\d+|release/v\d+)", action), action
    checkout_first = [job["steps"][0] for job in _load(path)["jobs"].values()]
    assert any(step.get("uses") == "actions/checkout@v4" for step in checkout_first)


# -- Read the Docs -------------------------------------------------------------------------------


def test_read_the_docs_builds_the_sphinx_docs_as_ci_does() -> None:
    rtd = _load(RTD)
    assert rtd["version"] == 2
    assert rtd["build"]["os"] in ("ubuntu-22.04", "ubuntu-24.04")
    assert rtd["build"]["tools"]["python"] == "3.11"
    assert rtd["sphinx"]["configuration"] == "docs/conf.py"
    assert (ROOT / rtd["sphinx"]["configuration"]).is_file()
    assert rtd["sphinx"]["fail_on_warning"] is True

    installs = rtd["python"]["install"]
    package = [i for i in installs if i.get("method") == "pip"]
    assert package == [{"method": "pip", "path": ".", "extra_requirements": ["docs"]}]
    for requirements in [i["requirements"] for i in installs if "requirements" in i]:
        assert (ROOT / requirements).is_file(), requirements


def test_read_the_docs_installs_cpu_torch_of_the_ci_version() -> None:
    jobs = _load(RTD)["build"]["jobs"]
    (command,) = [c for c in jobs["pre_install"] if " torch" in c]
    assert command.startswith("python -m pip install ")
    assert "--index-url https://download.pytorch.org/whl/cpu" in command
    ci_pins = set(re.findall(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text()))
    assert len(ci_pins) == 1, ci_pins
    assert re.findall(r"torch==([\w.+]+)", command) == list(ci_pins)


def test_docs_ship_the_mathjax_they_load() -> None:
    """The HTML shows formulas offline: conf.py loads the vendored MathJax, which is intact."""
    folder = ROOT / "docs" / "_static" / "mathjax"
    conf = (ROOT / "docs" / "conf.py").read_text()
    (name,) = re.findall(r'^_MATHJAX = DOCS / "_static" / "mathjax" / "([\w.-]+)"$', conf, re.M)
    assert "mathjax_path = _MATHJAX.name" in conf
    readme = (folder / "MathJax-README.txt").read_text()
    (digest,) = re.findall(rf"sha256 of {re.escape(name)}:\n([0-9a-f]{{64}})\n", readme)
    assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert "Apache License" in (folder / "MathJax-LICENSE.txt").read_text()


# -- CONTRIBUTING ----------------------------------------------------------------------------------


def test_release_checklist_points_to_the_release_files() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    checklist = text.split("## Release checklist", 1)[1].split("\n## ", 1)[0]
    for needed in (
        ".github/workflows/release.yml",
        ".readthedocs.yaml",
        "trusted publish",
        "`pypi`",
        "`torchcaps`",
    ):
        assert needed in checklist, needed
