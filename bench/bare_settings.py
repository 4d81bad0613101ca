"""Settings for the bare-view ceiling: AgentManager's settings and middleware, bench/bare_urls.py as URLs."""

from am_project.settings import *  # noqa: F403

ROOT_URLCONF = "bare_urls"
