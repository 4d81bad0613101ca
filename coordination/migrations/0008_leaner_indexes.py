# Every index of a hot table is written on every change of a row that is not HOT (a step changing status,
# each event and attempt inserted). These foreign keys' own indexes are left out: each is the first column of
# another index (`step_key_unique_in_workflow`, `attempt_number_unique`, `iteration_unique`,
# `event_seq_unique_per_workflow`), or, for the step's lease, replaced by a partial index without the NULLs of
# every step not leased.
#
# The indexes are dropped by name (Django's own names for them) rather than by AlterField's database side,
# which also drops every other index on the column: it dropped `attempt_one_open`, the unique index that
# refuses a second open attempt of a step.

import django.db.models.deletion
from django.db import migrations, models

# Each foreign key's own index that goes: (its name as Django made it in 0001, table, column).
UNINDEXED = [
    ("coordination_attempt_step_id_52c1da91", "coordination_attempt", "step_id"),
    ("coordination_event_workflow_id_175ee622", "coordination_event", "workflow_id"),
    ("coordination_iteration_attempt_id_b666f412", "coordination_iteration", "attempt_id"),
    ("coordination_step_lease_agent_id_6ac4eacc", "coordination_step", "lease_agent_id"),
    ("coordination_step_lease_attempt_id_2081dfa6", "coordination_step", "lease_attempt_id"),
    ("coordination_step_workflow_id_175a402b", "coordination_step", "workflow_id"),
]

DROP = "".join(f'DROP INDEX IF EXISTS "{name}";\n' for name, _, _ in UNINDEXED)
CREATE = "".join(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ("{column}");\n' for name, table, column in UNINDEXED)


class Migration(migrations.Migration):

    dependencies = [
        ('coordination', '0007_agent_change_notify'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='attempt',
                    name='step',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='attempts', to='coordination.step'),
                ),
                migrations.AlterField(
                    model_name='event',
                    name='workflow',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='events', to='coordination.workflow'),
                ),
                migrations.AlterField(
                    model_name='iteration',
                    name='attempt',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='iterations', to='coordination.attempt'),
                ),
                migrations.AlterField(
                    model_name='step',
                    name='lease_agent',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='leased_steps', to='coordination.agent'),
                ),
                migrations.AlterField(
                    model_name='step',
                    name='lease_attempt',
                    field=models.ForeignKey(blank=True, db_index=False, editable=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='coordination.attempt'),
                ),
                migrations.AlterField(
                    model_name='step',
                    name='workflow',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='steps', to='coordination.workflow'),
                ),
            ],
            database_operations=[migrations.RunSQL(DROP, CREATE)],
        ),
        migrations.AddIndex(
            model_name='step',
            index=models.Index(condition=models.Q(('lease_agent__isnull', False)), fields=['lease_agent'], name='step_lease_agent'),
        ),
        migrations.AddIndex(
            model_name='step',
            index=models.Index(condition=models.Q(('lease_attempt__isnull', False)), fields=['lease_attempt'], name='step_lease_attempt'),
        ),
    ]
