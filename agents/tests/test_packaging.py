"""The worker installs on its own: `pip install ./agents` into a fresh virtual environment, then `am-worker`.

The fresh environment has neither Django nor the server's requirements, so a
worker that ran there needs nothing but its own dependency list.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordination.models import Result, Step, WorkspaceFile
from coordination.services import workflow_creation

BASE_DIR = Path(__file__).resolve().parent.parent.parent
SERVER_MODULES = ("django", "coordination", "am_project", "dashboard", "rest_framework")

# Run in the fresh environment: everything a worker loads, then what got loaded with it.
IMPORT_CHECK = """
import sys
import agents, agents.cli, agents.runtime, agents.llm.openai_provider, agents.llm.scripted, agents.telemetry
print(agents.__file__)
print(",".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def _clean_env(**extra) -> dict[str, str]:
    """The environment without what points Python at the checkout or the server's settings."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _loaded_top_modules(python: str, cwd: Path) -> tuple[str, set[str]]:
    run = subprocess.run([python, "-c", IMPORT_CHECK], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    path, modules = run.stdout.splitlines()
    return path, set(modules.split(","))


class WorkerImportTests:
    def test_it_loads_nothing_of_the_server(self):
        _, modules = _loaded_top_modules(sys.executable, BASE_DIR)
        assert not modules & set(SERVER_MODULES), sorted(modules & set(SERVER_MODULES))


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with `pip install ./agents` (its dependencies from the index or pip's cache)."""
    venv = tmp_path_factory.mktemp("worker") / "venv"
    # No pip of its own (faster): this interpreter's pip installs into it, as `pip install ./agents` would.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--disable-pip-version-check", "-q", str(BASE_DIR / "agents")],
        env=_clean_env(), capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
class InstalledWorkerTests:
    def test_it_installs_without_django_and_loads_from_the_install(self, worker_venv, tmp_path):
        python = str(worker_venv / "bin" / "python")
        no_django = subprocess.run([python, "-c", "import django"], cwd=tmp_path, env=_clean_env(),
                                   capture_output=True, text=True, timeout=60)
        assert no_django.returncode != 0 and "No module named 'django'" in no_django.stderr
        path, modules = _loaded_top_modules(python, tmp_path)
        assert Path(path).is_relative_to(worker_venv), path  # the installed copy, not the checkout
        assert not modules & set(SERVER_MODULES)
        assert not (Path(path).parent / "tests").exists(), "the server-side tests stay out of the wheel"
        check = subprocess.run([sys.executable, "-m", "pip", "--python", python, "check"], env=_clean_env(),
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

    def test_am_worker_from_the_install_works_a_step(self, worker_venv, live_am, make_agent, step, workflow_spec,
                                                     tmp_path):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("scope", role="researcher", files=(("research/scope.md", "write"),)), name="Installed"))
        agent = make_agent("installed-1", ["researcher"])
        run = subprocess.run(
            [str(worker_venv / "bin" / "am-worker"), "--server", live_am, "--workspace", str(tmp_path / "mirrors"),
             "--llm", "scripted", "--name", "installed-1", "--max-steps", "1"],
            cwd=tmp_path, env=_clean_env(AM_TOKEN=agent.token), capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "✔ Installed / scope (researcher)  completed in" in run.stdout, run.stdout
        done = Step.objects.get(workflow=workflow, key="scope")
        assert done.status == "completed"
        assert Result.objects.get(step=done).attempt.agent.name == "installed-1"
        stored = WorkspaceFile.objects.get(project=workflow.project, path="research/scope.md", deleted=False)
        assert (tmp_path / "mirrors" / workflow.project.name / "research/scope.md").read_bytes().startswith(b"# ")
        assert stored.size > 0
