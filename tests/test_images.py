"""The container images, checked without a Docker engine: what they copy, pin and name."""

from __future__ import annotations

import ast
import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cdsp_core import config
from pipelines import cdsp_pipeline

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "images" / "Dockerfile.cpu", "cuda": REPO / "images" / "Dockerfile.cuda"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_defaults(steps) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)


def labels(steps) -> dict[str, str]:
    found = {}
    for word, rest in steps:
        if word == "LABEL":
            found.update((k, v.strip('"')) for k, v in re.findall(r'(\S+)=("[^"]*"|\S+)', rest))
    return found


def makefile_vars() -> dict[str, str]:
    return dict(re.findall(r"^(\w+) \?= *(.*)$", (REPO / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_copied_file_exists_and_reaches_the_build(kind):
    steps = instructions(DOCKERFILES[kind])
    ignore = (DOCKERFILES[kind].parent / f"{DOCKERFILES[kind].name}.dockerignore").read_text().split()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    copies = [rest.split()[:-1] for word, rest in steps if word == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"{DOCKERFILES[kind].name} copies {src}, which does not exist"
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded by .dockerignore"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_pinned_base_non_root_user_and_pinned_torch(kind):
    steps = instructions(DOCKERFILES[kind])
    args = arg_defaults(steps)
    base = [rest for word, rest in steps if word == "FROM"]
    assert len(base) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base[0])
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image  # exact patch release
    users = [rest for word, rest in steps if word == "USER"]
    # numeric, so that a kubelet asked for runAsNonRoot can verify it (KFP step pods rely on it: docs/reliability.md)
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), users
    assert args["TORCH_VERSION"] == metadata.version("torch").split("+")[0]  # the tested torch
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "-c images/constraints.txt" in runs
    cpu_index = "download.pytorch.org/whl/cpu"
    assert (cpu_index in args.get("TORCH_INDEX", "")) == (kind == "cpu")


def test_component_images_match_the_dockerfiles(tmp_path):
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    make = makefile_vars()
    names = {}
    for kind, path in DOCKERFILES.items():
        found = labels(instructions(path))
        assert found["org.opencontainers.image.version"] == version == make["IMAGE_TAG"]
        names[kind] = f"{make['REGISTRY']}/{found['org.opencontainers.image.title']}:{version}"
    # the defaults of the compile-time settings, the Makefile and the compiled YAML all agree
    assert config.ClusterConfig().image == names["cpu"]
    assert config.ClusterConfig().cuda_image == names["cuda"]
    assert make["CDSP_IMAGE"] == "$(REGISTRY)/cdsp-cpu:$(IMAGE_TAG)"
    assert make["CDSP_CUDA_IMAGE"] == "$(REGISTRY)/cdsp-cuda:$(IMAGE_TAG)"
    out = cdsp_pipeline.compile_pipeline(str(tmp_path / "p.yaml"), cdsp_pipeline.cluster_settings({}))
    spec = next(yaml.safe_load_all(Path(out).read_text()))
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images.pop("exec-data-prep") == names["cpu"]
    assert set(images.values()) == {names["cuda"]}


def test_the_images_install_every_package_a_component_function_imports():
    """kfp ships only a component function's own source; what its body imports comes from the image."""
    imported = set()
    for node in ast.walk(ast.parse((REPO / "components" / "stages.py").read_text())):
        if isinstance(node, ast.FunctionDef):
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.ImportFrom):
                    imported.add(stmt.module.split(".")[0])
                elif isinstance(stmt, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in stmt.names}
    assert imported == {"cdsp_core", "components"}
    packages = ast.literal_eval(re.search(r"^packages = (\[.*?\])", (REPO / "pyproject.toml").read_text(), re.M)[1])
    assert imported <= set(packages)  # installed by `pip install .`
    for kind, path in DOCKERFILES.items():
        copied = {rest.split()[0] for word, rest in instructions(path) if word == "COPY"}
        assert imported <= copied, kind


def runtime_closure() -> set[str]:
    """Every distribution the project needs at run time (its requirements, recursively, no extras)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in metadata.requires("cdsp-pipelines") or []]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.requires(req.name) or []]
    return seen


def test_constraints_pin_every_runtime_dependency_at_the_tested_version():
    lines = (REPO / "images" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if "==" in line)
    pins = {canonicalize_name(k): v for k, v in pins.items()}
    assert "torch" not in pins  # each image pins its own torch build
    for name in runtime_closure() - {"torch"}:
        if name.startswith("nvidia-") or name == "triton":  # CUDA-only wheels; the CPU venv has none
            continue
        assert pins.get(name) == metadata.version(name), f"{name}: run images/freeze.sh"
