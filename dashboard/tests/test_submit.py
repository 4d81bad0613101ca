"""Submitting work from the dashboard: a graph as YAML or JSON, or a goal to plan."""

import pytest

from coordination.models import Workflow

pytestmark = pytest.mark.django_db


class SubmitTests:
    def test_it_submits_a_yaml_graph(self, owner_browser):
        graph = "name: From YAML\nsteps:\n  - {key: a, name: A, role: writer}\n  - {key: b, name: B, role: writer, depends_on: [a]}\n"
        response = owner_browser.post("/submit/", {"graph": graph})
        workflow = Workflow.objects.get(name="From YAML")
        assert response.status_code == 302 and response["Location"] == f"/workflows/{workflow.id}/"
        assert workflow.total_steps == 2

    def test_it_shows_a_cycle_in_a_json_graph_by_the_input(self, owner_browser):
        graph = '{"name": "Loop", "steps": [{"key": "a", "role": "x", "depends_on": ["b"]}, {"key": "b", "role": "x", "depends_on": ["a"]}]}'
        response = owner_browser.post("/submit/", {"graph": graph})
        assert response.status_code == 400
        html = response.content.decode()
        assert "Dependency cycle: a -&gt; b -&gt; a" in html and 'class="field-errors"' in html
        assert not Workflow.objects.filter(name="Loop").exists()

    def test_it_explains_malformed_text(self, owner_browser):
        response = owner_browser.post("/submit/", {"graph": "name: [unclosed"})
        assert response.status_code == 400 and "Not valid JSON or YAML" in response.content.decode()

    def test_it_starts_planning_a_goal(self, owner_browser):
        response = owner_browser.post("/submit/", {"goal": "Write a market study", "name": "Study"})
        assert response.status_code == 302
        assert Workflow.objects.get(name="Study").status == "planning"
