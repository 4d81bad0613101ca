"""The workspace on the dashboard: projects, the tree, a file, its history and diffs, downloads, a step's changes."""

import io
import re
import tarfile

import pytest

from coordination.models import FileLock, Step
from coordination.services import projects, workspace

pytestmark = pytest.mark.django_db

SCRIPT = b"<script>alert(1)</script>\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.fixture
def site(owner):
    """Project "site": v1 adds README.md, src/app.py and logo.png; v2 edits src/app.py; v3 adds evil.html."""
    projects.project_create(name="site")
    workspace.workspace_write(project_name="site", user=owner, changes=[
        workspace.Change("README.md", b"# Site\n"), workspace.Change("src/app.py", b"def main():\n    return 1\n"),
        workspace.Change("logo.png", PNG)])
    workspace.workspace_write(project_name="site", user=owner, changes=[
        workspace.Change("src/app.py", b"def main():\n    return 2\n")])
    workspace.workspace_write(project_name="site", user=owner, changes=[workspace.Change("evil.html", SCRIPT)])
    return "site"


@pytest.fixture
def written_step(workflow, developer):
    """Step A of the workflow wrote src/a.py under its lease's lock (a file with markup in it)."""
    lock = FileLock.objects.get(path="src/a.py", released_at__isnull=True)
    workspace.workspace_write(project_name=workflow.project.name, agent=developer.agent, changes=[
        workspace.Change("src/a.py", b"x = '<b>bold</b>'\n", fencing=lock.fencing)])
    return Step.objects.get(workflow=workflow, key="A")


class ProjectPagesTests:
    def test_it_lists_projects_with_their_version_and_archive(self, owner_browser, site):
        html = owner_browser.get("/projects/").content.decode()
        assert 'href="/projects/site/"' in html and "<td>3</td>" in html
        assert 'href="/projects/site/archive"' in html
        assert 'href="/projects/"' in html  # the nav link

    def test_it_shows_the_tree_at_the_latest_version_without_javascript(self, owner_browser, site):
        html = owner_browser.get("/projects/site/").content.decode()
        assert 'id="workspace-tree" data-version="3"' in html
        for path in ("README.md", "src/app.py", "logo.png", "evil.html"):
            assert f'href="/projects/site/files/{path}"' in html, path
        assert ">src/</a>" in html
        assert 'ws-connect="/ws/projects/site/"' in html

    def test_it_shows_the_tree_as_it_was_at_an_older_version(self, owner_browser, site):
        html = owner_browser.get("/projects/site/?version=1").content.decode()
        assert 'data-version="1"' in html and "evil.html" not in html and "README.md" in html
        assert "ws-connect" not in html, "a pinned version does not change: no live updates"

    def test_it_shows_the_tree_under_a_directory(self, owner_browser, site):
        html = owner_browser.get("/projects/site/?dir=src/").content.decode()
        assert "app.py" in html and "README.md" not in html

    def test_it_refuses_a_version_out_of_range(self, owner_browser, site):
        response = owner_browser.get("/projects/site/?version=99")
        assert response.status_code == 400 and "out of range" in response.content.decode()

    def test_it_answers_404_for_an_unknown_project_or_file(self, owner_browser, site):
        assert owner_browser.get("/projects/nope/").status_code == 404
        assert owner_browser.get("/projects/site/files/nope.txt").status_code == 404

    def test_it_shows_a_file_highlighted_with_line_numbers(self, owner_browser, site):
        html = owner_browser.get("/projects/site/files/src/app.py").content.decode()
        assert 'id="workspace-file" data-version="2"' in html
        assert 'class="source' in html and 'class="linenos"' in html and 'href="#L-2"' in html
        assert '<span class="k">def</span>' in html and '<span class="mi">2</span>' in html
        assert 'ws-connect="/ws/projects/site/files/src/app.py"' in html

    def test_it_shows_an_older_version_of_a_file(self, owner_browser, site):
        html = owner_browser.get("/projects/site/files/src/app.py?version=1").content.decode()
        assert '<span class="mi">1</span>' in html and '<span class="mi">2</span>' not in html.split('id="file-history"')[0]

    def test_it_escapes_markup_in_a_files_content(self, owner_browser, site):
        html = owner_browser.get("/projects/site/files/evil.html").content.decode()
        assert "<script>alert(1)</script>" not in html
        assert "&lt;" in html and "alert" in html

    def test_it_offers_a_binary_file_as_a_download(self, owner_browser, site):
        html = owner_browser.get("/projects/site/files/logo.png").content.decode()
        assert "A binary file" in html and 'href="/projects/site/download/logo.png"' in html
        response = owner_browser.get("/projects/site/download/logo.png")
        assert response.status_code == 200 and response.content == PNG
        assert response["Content-Disposition"] == 'attachment; filename="logo.png"'
        assert response["Content-Type"] == "application/octet-stream"

    def test_it_downloads_a_file_as_it_was(self, owner_browser, site):
        response = owner_browser.get("/projects/site/download/src/app.py?version=1")
        assert response.content == b"def main():\n    return 1\n"

    def test_it_lists_a_files_history_and_diffs_two_versions(self, owner_browser, site):
        html = owner_browser.get("/projects/site/files/src/app.py?from=1&to=2").content.decode()
        assert 'id="history-2"' in html and 'id="history-1"' in html
        assert '<select name="from">' in html and '<select name="to">' in html
        diff = html.split('id="file-diff"')[1]
        assert '<span class="d-del">-    return 1</span>' in diff and '<span class="d-add">+    return 2</span>' in diff

    def test_it_diffs_from_before_a_file_existed_and_escapes_it(self, owner_browser, site):
        html = owner_browser.get("/projects/site/files/evil.html?from=0&to=3").content.decode()
        diff = html.split('id="file-diff"')[1]
        assert "+&lt;script&gt;alert(1)&lt;/script&gt;" in diff and "<script>alert" not in html

    def test_it_streams_the_archive(self, owner_browser, site):
        response = owner_browser.get("/projects/site/archive?version=2")
        assert response["Content-Disposition"] == 'attachment; filename="site-v2.tar.gz"'
        with tarfile.open(fileobj=io.BytesIO(b"".join(response.streaming_content)), mode="r:gz") as archive:
            assert sorted(archive.getnames()) == ["README.md", "logo.png", "src/app.py"]

    def test_it_sends_an_anonymous_visitor_to_the_login(self, client, site):
        for url in ("/projects/", "/projects/site/", "/projects/site/files/README.md",
                    "/projects/site/download/README.md", "/projects/site/archive"):
            response = client.get(url)
            assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url


class StepAndWorkflowFilesTests:
    def test_it_shows_a_steps_changes_with_their_diffs_escaped(self, owner_browser, written_step):
        html = owner_browser.get(f"/steps/{written_step.id}/").content.decode()
        changes = html.split('id="step-changes"')[1].split("</section>")[0]
        assert "src/a.py" in changes and "created" in changes
        assert "+x = &#x27;&lt;b&gt;bold&lt;/b&gt;&#x27;" in changes and "<b>bold" not in html
        assert re.search(r'href="/projects/[\w-]+/files/src/a.py\?version=1"', changes)

    def test_it_lists_the_files_a_workflows_steps_changed(self, owner_browser, written_step):
        html = owner_browser.get(f"/workflows/{written_step.workflow_id}/").content.decode()
        files = html.split('id="workflow-files"')[1].split("</table>")[0]
        assert "src/a.py" in files and f'href="/steps/{written_step.id}/"' in files

    def test_it_links_each_lock_to_its_file(self, owner_browser, workflow):
        html = owner_browser.get("/locks/").content.decode()
        assert f'href="/projects/{workflow.project.name}/files/src/a.py"><code>src/a.py</code>' in html
