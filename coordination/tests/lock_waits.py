"""For tests that hold a transaction open beside the one under test: wait until some backend waits on a lock."""

import time


def wait_until_a_backend_waits_on_a_lock(cursor, timeout: float = 10.0) -> None:
    """Until a backend of this database waits on a lock (the test's request, queued behind the held one), read
    through `cursor` (any connection: Django's or psycopg's); AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        if cursor.fetchone()[0]:
            return
        time.sleep(0.01)
    raise AssertionError("no backend came to wait on a lock")
