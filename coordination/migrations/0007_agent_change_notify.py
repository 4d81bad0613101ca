# Each process keeps agents by token hash (coordination/agent_cache.py) and must drop one as soon as its row
# changes, whoever changes it: a service, the admin, or SQL typed by hand. A trigger is the only place that sees
# every one of those, and `pg_notify` is delivered when the change commits (never for a rollback), to the
# listener thread of every process (`am_agents`, coordination/notify.py).
#
# An update that only touches `last_seen_at` (every few seconds per agent, on every agent's requests) or
# `pull_seq` (every pull) says nothing: it changes nothing the cache decides with, and would empty it as fast
# as it fills. Three triggers,
# because a DELETE trigger's WHEN may not name NEW and a TRUNCATE trigger is per statement (payload "*": every
# agent).

from django.db import migrations

CREATE = """
CREATE FUNCTION coordination_agent_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('am_agents', '*');
    ELSE
        PERFORM pg_notify('am_agents', OLD.id::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER coordination_agent_updated AFTER UPDATE ON coordination_agent FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'last_seen_at' - 'pull_seq') IS DISTINCT FROM (to_jsonb(NEW) - 'last_seen_at' - 'pull_seq'))
    EXECUTE FUNCTION coordination_agent_notify();

CREATE TRIGGER coordination_agent_deleted AFTER DELETE ON coordination_agent FOR EACH ROW
    EXECUTE FUNCTION coordination_agent_notify();

CREATE TRIGGER coordination_agent_truncated AFTER TRUNCATE ON coordination_agent FOR EACH STATEMENT
    EXECUTE FUNCTION coordination_agent_notify();
"""

DROP = """
DROP TRIGGER coordination_agent_truncated ON coordination_agent;
DROP TRIGGER coordination_agent_deleted ON coordination_agent;
DROP TRIGGER coordination_agent_updated ON coordination_agent;
DROP FUNCTION coordination_agent_notify();
"""


class Migration(migrations.Migration):

    dependencies = [
        ('coordination', '0006_agent_pull_seq'),
    ]

    operations = [
        migrations.RunSQL(CREATE, DROP),
    ]
