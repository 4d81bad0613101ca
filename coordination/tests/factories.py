"""Spec builders for the modules that still import them as functions: test_mcp.py, test_live_server.py, test_admin.py.

The builders live in the root conftest.py and reach tests as the `step` and
`workflow_spec` fixtures; once those three modules take the fixtures, delete this file.
"""

from conftest import build_step as step, build_workflow_spec as workflow_spec  # noqa: F401
