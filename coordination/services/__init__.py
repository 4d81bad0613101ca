"""Every state change of the coordination domain, one module per concern.

Whatever calls them (API views, the MCP endpoint, the dashboard, admin forms and
actions, Celery tasks), writes go through these functions: they hold the
business rules, lock what they change in the order `lock_order` states, record
an `Event` in the same transaction and publish it after commit. Callers import
the module they use (`from coordination.services import reports`).

- `tokens`: agents' and people's API tokens, lease tokens.
- `agent_registry`: agents, their roles, capacity and presence.
- `projects`: projects (the namespace of a workspace).
- `workflow_specs`: what a submitter or the planner sends, and its validation.
- `workflow_creation`: a graph stored, a goal planned.
- `workflow_counters`: a workflow's counters and spend (its row and its deltas), settling.
- `pull`: leasing the best ready step, the long-poll, what could be pulled now.
- `leases`: heartbeats, hand-backs, expiry of a dead agent's lease.
- `reports`: results applied (and people's approval decisions).
- `workflow_control`: cancel, pause, resume, retry, edit, delete.
- `step_edits`: a step's descriptive fields edited by a person.
- `file_locks`: path locks with expiry and fencing.
- `audits`: audits, rework, synthesis.
- `event_log`: the ordered event log.
- `background`: Celery work sent after commit.
- `lock_order`: the one order rows are locked in, and the retry safety net.
"""
