"""What the docs tell a newcomer to run works as printed in a fresh shell, and MLflow links open the right view."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medgain.tracking import ML_WORKFLOW_QUERY, ui_command, ui_url

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts)
# docker/README.md shows commands that run inside the image, whose python is medgain's
HOST_DOCS = [p for p in DOCS if p.parent.name != "docker"]
# executables that exist only inside the Makefile's virtualenv: a fresh shell needs the .venv/bin/ path
VENV_ONLY = ("python", "python3", "mlflow", "torchrun", "medgain", "pip", "pytest")


def _shell_lines(text: str) -> list[str]:
    """Command lines of the ```bash / ```sh / ```shell / ```console blocks (continuations folded away)."""
    lines, inside = [], False
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*(\w*)", line)
        if fence:
            inside = not inside and fence.group(1) in {"bash", "sh", "shell", "console"}
            continue
        if inside and line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip().removeprefix("$ "))
    return lines


@pytest.mark.parametrize("doc", HOST_DOCS, ids=[str(p.relative_to(ROOT)) for p in HOST_DOCS])
def test_documented_commands_run_in_a_fresh_shell(doc: Path) -> None:
    text = doc.read_text()
    activated = "source .venv/bin/activate" in text
    for line in _shell_lines(text):
        words = [w for w in line.split() if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]  # VAR=value prefixes
        word = words[0] if words else ""
        if word in VENV_ONLY and not activated:
            pytest.fail(f"{doc.relative_to(ROOT)}: `{line}` needs the virtualenv: write .venv/bin/{word}")


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_mlflow_ui_links_open_the_model_training_view(doc: Path) -> None:
    for link in re.findall(r"https?://(?:127\.0\.0\.1|localhost):\d+/\S*", doc.read_text()):
        assert ML_WORKFLOW_QUERY in link, f"{doc.relative_to(ROOT)}: {link} opens MLflow's GenAI view"


def test_printed_ui_command_and_url() -> None:
    command = ui_command("sqlite:////tmp/x/mlflow.db")
    env, executable, *_ = command.split()
    assert Path(executable).is_absolute() and Path(executable).is_file()  # runs as printed, from any folder
    assert "--backend-store-uri sqlite:////tmp/x/mlflow.db" in command
    # one process to stop: no uvicorn worker pool, no job consumers left behind by Ctrl+C or kill
    assert env == "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" and command.endswith("--workers 1")
    assert ui_url("3") == f"http://127.0.0.1:5000/#/experiments/3?{ML_WORKFLOW_QUERY}"
