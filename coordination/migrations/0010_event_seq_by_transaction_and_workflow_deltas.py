"""Events numbered by their transaction, and counters moved by deltas: the workflow row stops being a queue.

Every pull and report used to update its workflow's row (an event number, the
counters), so the agents of one workflow took turns on that row's lock.
- `Event.seq` is now its transaction's id times 2**20 plus its rank in that
  transaction (`coordination_event_seq()`, the column's default), and the log is
  read below the oldest transaction still running (`coordination_event_seq_bound()`),
  so a reader going on from its last seq misses nothing, with no counter to lock. Existing numbers (1, 2, ...) stay below
  every new one; an event without a workflow gets 0.
- `WorkflowDelta` rows carry the hot paths' counter and spend moves; they are
  folded into the workflow row under its lock (`workflow_counters`).
"""

import coordination.models
import django.db.models.deletion
from django.db import migrations, models

FUNCTIONS_SQL = """
CREATE FUNCTION coordination_event_seq() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n integer := coalesce(nullif(current_setting('coordination.event_n', true), ''), '0')::integer + 1;
BEGIN
    IF n >= 1048576 THEN
        RAISE EXCEPTION 'a transaction may record at most 1048575 events'
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    PERFORM set_config('coordination.event_n', n::text, true);  -- true: until the transaction ends
    RETURN (pg_current_xact_id()::text::bigint << 20) + n;
END $$;

-- Below it, no event can be added any more: the oldest transaction of the caller's snapshot still running, else
-- the first one not yet started when the snapshot was taken. A transaction known to run in another database
-- cannot write here and does not count; one not known (ended since the snapshot, or not shown to this role)
-- counts.
CREATE FUNCTION coordination_event_seq_bound() RETURNS bigint LANGUAGE sql STABLE AS $$
    WITH elsewhere AS (
        SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity
        WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()
    )
    SELECT least(
        (SELECT min(x::text::bigint) FROM pg_snapshot_xip(s) AS x
         WHERE x::text::bigint % 4294967296 NOT IN (SELECT xid FROM elsewhere)),
        pg_snapshot_xmax(s)::text::bigint
    ) << 20
    FROM pg_current_snapshot() AS s
$$;

-- The first number of the caller's own transaction (NULL before it has written): a transaction reads its own
-- events too.
CREATE FUNCTION coordination_event_seq_own() RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT pg_current_xact_id_if_assigned()::text::bigint << 20
$$;
"""

DROP_FUNCTIONS_SQL = """
DROP FUNCTION coordination_event_seq_own();
DROP FUNCTION coordination_event_seq_bound();
DROP FUNCTION coordination_event_seq();
"""

BACKFILL_SQL = """
DO $$
BEGIN
    IF (SELECT max(seq) FROM coordination_event) >= (pg_current_xact_id()::text::bigint << 20) THEN
        RAISE EXCEPTION 'an event number is above the new numbering: renumber the log before migrating';
    END IF;
END $$;
UPDATE coordination_event SET seq = 0 WHERE seq IS NULL;
"""

UNFILL_SQL = "UPDATE coordination_event SET seq = NULL WHERE workflow_id IS NULL;"

EVENT_SEQ_BACK_SQL = """
UPDATE coordination_workflow w SET event_seq = e.seq FROM (
    SELECT workflow_id, max(seq) AS seq FROM coordination_event WHERE workflow_id IS NOT NULL GROUP BY workflow_id
) AS e WHERE e.workflow_id = w.id;
"""

# Reversed, the deltas are folded into their workflows' rows first (this is the last operation: it is undone first).
FOLD_BACK_SQL = """
UPDATE coordination_workflow w
SET n_pending = w.n_pending + d.n_pending, n_ready = w.n_ready + d.n_ready,
    n_in_progress = w.n_in_progress + d.n_in_progress, n_completed = w.n_completed + d.n_completed,
    n_failed = w.n_failed + d.n_failed, n_cancelled = w.n_cancelled + d.n_cancelled,
    n_skipped = w.n_skipped + d.n_skipped, spent_usd = w.spent_usd + d.spent_usd,
    spent_tokens = w.spent_tokens + d.spent_tokens
FROM (SELECT workflow_id, sum(n_pending) AS n_pending, sum(n_ready) AS n_ready, sum(n_in_progress) AS n_in_progress,
             sum(n_completed) AS n_completed, sum(n_failed) AS n_failed, sum(n_cancelled) AS n_cancelled,
             sum(n_skipped) AS n_skipped, sum(spent_usd) AS spent_usd, sum(spent_tokens) AS spent_tokens
      FROM coordination_workflowdelta GROUP BY workflow_id) AS d
WHERE d.workflow_id = w.id;
DELETE FROM coordination_workflowdelta;
"""


class Migration(migrations.Migration):

    dependencies = [
        ('coordination', '0009_event_settled_index'),
    ]

    operations = [
        migrations.CreateModel(
            name='WorkflowDelta',
            fields=[
                ('id', models.BigAutoField(primary_key=True, serialize=False)),
                ('n_pending', models.IntegerField(db_default=0)),
                ('n_ready', models.IntegerField(db_default=0)),
                ('n_in_progress', models.IntegerField(db_default=0)),
                ('n_completed', models.IntegerField(db_default=0)),
                ('n_failed', models.IntegerField(db_default=0)),
                ('n_cancelled', models.IntegerField(db_default=0)),
                ('n_skipped', models.IntegerField(db_default=0)),
                ('spent_usd', models.DecimalField(db_default=0, decimal_places=6, max_digits=14)),
                ('spent_tokens', models.BigIntegerField(db_default=0)),
                ('at', models.DateTimeField()),
            ],
        ),
        migrations.AlterModelOptions(
            name='workflow',
            options={'base_manager_name': 'objects', 'ordering': ['-created_at']},
        ),
        migrations.RemoveConstraint(
            model_name='event',
            name='event_seq_iff_workflow',
        ),
        migrations.RunSQL(FUNCTIONS_SQL, reverse_sql=DROP_FUNCTIONS_SQL),
        migrations.RunSQL(BACKFILL_SQL, reverse_sql=UNFILL_SQL),
        migrations.RunSQL(migrations.RunSQL.noop, reverse_sql=EVENT_SEQ_BACK_SQL),
        migrations.RemoveField(
            model_name='workflow',
            name='event_seq',
        ),
        migrations.AlterField(
            model_name='event',
            name='seq',
            field=models.BigIntegerField(db_default=coordination.models.NextEventSeq(), editable=False),
        ),
        migrations.AddField(
            model_name='workflowdelta',
            name='workflow',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+', to='coordination.workflow'),
        ),
        migrations.RunSQL(migrations.RunSQL.noop, reverse_sql=FOLD_BACK_SQL),
    ]
