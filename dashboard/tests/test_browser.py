"""A real browser (Debian's Chromium, headless, driven by Playwright) on the live server."""

import os

import httpx
import pytest

from coordination.services import pull, workflow_creation
from coordination.models import Step

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHROMIUM = os.environ.get("AM_CHROMIUM", "/usr/bin/chromium")


class BrowserTests:
    def test_a_step_completed_through_the_api_turns_completed_on_the_open_page_and_a_human_step_is_approved(
        self, live_am, django_user_model, make_agent, step, workflow_spec
    ):
        django_user_model.objects.create_user(username="watcher", password="pw-watcher-123")
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("A"), step("H", "A", role="human"), name="Watched"))
        agent = make_agent("browser-agent", ["developer"])
        lease = pull.step_pull(agent=agent.agent, roles=["developer"])
        a_id, h_id = str(lease.step.id), str(Step.objects.get(workflow=workflow, key="H").id)
        headers = {"Authorization": f"Bearer {agent.token}"}

        # From here on the test only talks HTTP: the ORM may not run inside Playwright's event loop.
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"{live_am}/accounts/login/?next=/workflows/{workflow.id}/")
            page.fill("input[name=username]", "watcher")
            page.fill("input[name=password]", "pw-watcher-123")
            page.click("button[type=submit]")
            page.wait_for_selector(f"#step-{a_id}[data-status=in_progress]")
            page.wait_for_function("document.body.dataset.live === 'open'")
            page.evaluate("window.__noReload = 'still here'")

            report = httpx.post(f"{live_am}/v1/report_result", headers=headers, json={
                "step_id": a_id, "lease_token": lease.token, "status": "completed", "final_result": "done"})
            assert report.status_code == 200
            page.wait_for_selector(f"#step-{a_id}[data-status=completed]", timeout=5000)
            page.wait_for_selector(f"#step-{h_id}[data-status=ready]", timeout=5000)
            # The report's last event is on the page: no redraw of the steps is still on its way to wipe the form.
            page.wait_for_selector("#timeline li.kind-stepsreleased", timeout=5000)
            assert page.evaluate("window.__noReload") == "still here", "updated in place, without a reload"

            page.fill(f"#step-{h_id} input[name=comment]", "Ship it")
            page.click(f"#step-{h_id} button[value=approve]")
            page.wait_for_selector(f"#step-{h_id}[data-status=completed]", timeout=5000)
            page.wait_for_selector("#workflow-header[data-status=completed]", timeout=5000)
            browser.close()

        human = Step.objects.get(id=h_id)
        assert human.status == "completed" and "Ship it" in human.final_result
