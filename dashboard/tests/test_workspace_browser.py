"""The workspace in a real browser (Debian's Chromium, headless, driven by Playwright) on the live server."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from coordination.services import file_locks, projects, pull, workflow_creation, workspace

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHROMIUM = os.environ.get("AM_CHROMIUM", "/usr/bin/chromium")


def _outside_the_browser_loop(fn):
    """Run `fn` on another thread: the ORM may not run inside Playwright's event loop."""
    def run():
        try:
            return fn()
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def _logged_in_page(browser, live_am, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{live_am}/accounts/login/?next={url}")
    page.fill("input[name=username]", "watcher")
    page.fill("input[name=password]", "pw-watcher-123")
    page.click("button[type=submit]")
    return page


@pytest.fixture
def watcher(django_user_model):
    return django_user_model.objects.create_user(username="watcher", password="pw-watcher-123")


class WorkspaceBrowserTests:
    def test_an_agents_write_updates_the_open_file_and_tree_without_a_reload(self, live_am, watcher, make_agent):
        projects.project_create(name="notes")
        workspace.workspace_write(project_name="notes", user=watcher, changes=[
            workspace.Change("docs/plan.md", b"# Plan\n\nfirst draft\n")])
        agent = make_agent("scribe", ["writer"])
        lock = file_locks.locks_acquire(agent=agent.agent, paths=["docs/"], mode="write", project_name="notes")[0]

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = _logged_in_page(browser, live_am, "/projects/notes/files/docs/plan.md")
            page.wait_for_selector("#workspace-file .source-view >> text=first draft")
            page.wait_for_function("document.body.dataset.live === 'open'")
            page.evaluate("window.__noReload = 'still here'")

            _outside_the_browser_loop(lambda: workspace.workspace_write(project_name="notes", agent=agent.agent, changes=[
                workspace.Change("docs/plan.md", b"# Plan\n\n<i>second</i> draft\n", fencing=lock.fencing),
                workspace.Change("docs/todo.md", b"- ship\n", fencing=lock.fencing)]))

            page.wait_for_selector('#workspace-file[data-version="2"]', timeout=5000)
            assert "<i>second</i> draft" in page.inner_text("#workspace-file .source-view"), "shown as text, escaped"
            page.wait_for_selector('#workspace-tree li[data-path="docs/todo.md"]', timeout=5000)
            page.wait_for_selector("#history-2", timeout=5000)
            assert page.evaluate("window.__noReload") == "still here", "updated in place, without a reload"
            browser.close()

    def test_the_step_page_shows_the_diff_of_the_steps_change(self, live_am, watcher, make_agent, step,
                                                              workflow_spec):
        projects.project_create(name="app")
        workspace.workspace_write(project_name="app", user=watcher, changes=[
            workspace.Change("src/main.py", b"print('hello')\n")])
        workflow_creation.workflow_create(spec=workflow_spec(
            step("A", files=(("src/main.py", "write"),)), name="Edit", project="app"))
        agent = make_agent("coder", ["developer"])
        lease = pull.step_pull(agent=agent.agent, roles=["developer"])
        workspace.workspace_write(project_name="app", agent=agent.agent, changes=[
            workspace.Change("src/main.py", b"print('hello, world')\n", fencing=lease.locks[0].fencing)])

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = _logged_in_page(browser, live_am, f"/steps/{lease.step.id}/")
            page.wait_for_selector("#step-changes")
            assert page.inner_text("#step-changes .d-del") == "-print('hello')"
            assert page.inner_text("#step-changes .d-add") == "+print('hello, world')"
            page.click("#step-changes summary a")
            page.wait_for_selector("#workspace-file .source-view >> text=hello, world")
            browser.close()

    def test_the_project_page_shows_a_file(self, live_am, watcher):
        projects.project_create(name="site")
        workspace.workspace_write(project_name="site", user=watcher, changes=[
            workspace.Change("index.html", b"<h1>Welcome</h1>\n"), workspace.Change("css/site.css", b"h1 {}\n")])

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = _logged_in_page(browser, live_am, "/projects/")
            page.click("#project-site a")
            page.click('#workspace-tree li[data-path="index.html"] a')
            page.wait_for_selector("#workspace-file .source-view")
            assert page.inner_text("#workspace-file .source-view .code") .strip() == "<h1>Welcome</h1>"
            assert page.query_selector("#workspace-file h1") is None, "the content is text, not markup"
            assert page.inner_text("#workspace-file .linenos").strip() == "1"
            browser.close()
