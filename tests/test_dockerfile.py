"""Static checks of Dockerfile.ascend: base image and tag, pins that agree with pyproject.toml, CANN environment,
entrypoint, and no secrets. The image itself is not built here."""

import json
import re
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO_ROOT / "Dockerfile.ascend").read_text()
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# Instructions with their continuation lines joined, comments dropped.
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.splitlines() if not l.lstrip().startswith("#"))).splitlines()
    if line.strip()
]


def instructions(keyword):
    return [line[len(keyword):].strip() for line in INSTRUCTIONS if line.upper().startswith(keyword + " ")]


def pin(requirements, name):
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}==([\w.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(1)
    raise AssertionError(f"no {name}== pin in {requirements}")


def test_base_image_is_ascendai_cann_chosen_by_a_tag_arg():
    assert INSTRUCTIONS[0] == "ARG CANN_TAG=8.2.rc1-910b-ubuntu22.04-py3.11"
    assert instructions("FROM") == ["ascendai/cann:${CANN_TAG}"]
    assert "--build-arg CANN_TAG=8.2.rc1-310p-ubuntu22.04-py3.11" in DOCKERFILE


@pytest.mark.parametrize("tag", ["8.2.rc1-910b-ubuntu22.04-py3.11", "8.2.rc1-310p-ubuntu22.04-py3.11"])
def test_documented_tags_follow_the_cann_image_scheme(tag):
    assert tag in DOCKERFILE
    assert re.fullmatch(r"\d+\.\d+\.\w+-(910b|310p|a3)-(ubuntu\d+\.\d+|openeuler\d+\.\d+)-py3\.11", tag)


def test_torch_pin_matches_pyproject_and_torch_npu():
    torch_pin = pin(PYPROJECT["project"]["dependencies"], "torch")
    torch_npu_pin = pin(PYPROJECT["project"]["optional-dependencies"]["npu"], "torch-npu")
    runs = " ".join(instructions("RUN"))
    match = re.search(r"pip install torch==([\w.]+) --index-url https://download\.pytorch\.org/whl/cpu", runs)
    assert match, "torch must come from the CPU wheel index"
    assert match.group(1) == torch_pin == torch_npu_pin == "2.13.0"


def test_kit_installed_with_npu_and_export_extras():
    assert re.search(r'pip install "/opt/moevl\[npu,export\]"', " ".join(instructions("RUN")))
    assert instructions("COPY") == [". /opt/moevl"]


def test_cann_environment_is_set_for_every_process():
    env = " ".join(instructions("ENV"))
    assert "ASCEND_TOOLKIT_HOME=/usr/local/Ascend/ascend-toolkit/latest" in env
    for fragment in (
        "LD_LIBRARY_PATH=${ASCEND_TOOLKIT_HOME}/lib64:",
        "ASCEND_OPP_PATH=${ASCEND_TOOLKIT_HOME}/opp",
        "ASCEND_HOME_PATH=${ASCEND_TOOLKIT_HOME}",
        "PYTHONPATH=${ASCEND_TOOLKIT_HOME}/python/site-packages:",
        "PATH=${ASCEND_TOOLKIT_HOME}/bin:",
    ):
        assert fragment in env
    # torch-npu works inside the image, so torch's backend autoload is left at its default there.
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD" not in env


def test_entrypoint_sources_set_env_then_runs_moevl():
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/local/bin/ascend-entrypoint.sh", "moevl"]
    script = next(run for run in instructions("RUN") if "ascend-entrypoint.sh" in run)
    assert "/usr/local/Ascend/ascend-toolkit/set_env.sh" in script
    assert "source" in script
    assert "exec \"$@\"" in script
    assert json.loads(instructions("CMD")[0]) == ["doctor"]


def test_no_secrets_in_the_dockerfile():
    assert not re.search(r"token|passw|secret|api[_-]?key|credential|AKIA|hf_[A-Za-z0-9]{10}", DOCKERFILE, re.IGNORECASE)
    assert not re.search(r"https?://[^/\s]+:[^@\s]+@", DOCKERFILE)  # no user:password@host URLs
    assert not any(arg.split("=")[0].upper().endswith(("KEY", "TOKEN", "PASSWORD")) for arg in instructions("ARG"))
