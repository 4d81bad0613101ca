"""What the server says when PostgreSQL refuses work: busy (retry) versus unreachable, from real errors."""

import threading

import psycopg
import pytest
from django.db import OperationalError, connection, connections
from psycopg_pool import ConnectionPool

from coordination import db_errors
from coordination.errors import Busy
from coordination.services import lock_order

pytestmark = pytest.mark.django_db(transaction=True)


def _real_deadlock() -> OperationalError:
    """Two connections lock two rows in opposite orders; PostgreSQL aborts one of them."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS am_deadlock_probe (id int PRIMARY KEY)")
        cursor.execute("INSERT INTO am_deadlock_probe VALUES (1), (2) ON CONFLICT DO NOTHING")
    both_hold_one = threading.Barrier(2)
    errors: list[BaseException] = []

    def lock(first: int, second: int) -> None:
        try:
            from django.db import transaction

            with transaction.atomic(), connections["default"].cursor() as cursor:
                cursor.execute("SELECT 1 FROM am_deadlock_probe WHERE id = %s FOR UPDATE", [first])
                both_hold_one.wait(timeout=10)
                cursor.execute("SELECT 1 FROM am_deadlock_probe WHERE id = %s FOR UPDATE", [second])
        except OperationalError as exc:
            errors.append(exc)
        finally:
            connections["default"].close()

    threads = [threading.Thread(target=lock, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE am_deadlock_probe")
    assert len(errors) == 1, errors
    return errors[0]


class DatabaseErrorTests:
    def test_a_deadlock_is_a_busy_server_that_may_be_retried(self):
        error = _real_deadlock()
        assert lock_order.conflict_reason(error) == "a deadlock with another transaction"
        answer = db_errors.explain(error)
        assert isinstance(answer, Busy) and answer.status == 503 and answer.code == "busy"
        assert "deadlock" in answer.detail and "unreachable" not in answer.detail

    def test_a_pool_with_no_free_connection_is_busy_not_unreachable(self):
        params = connection.get_connection_params()
        conninfo = psycopg.conninfo.make_conninfo(
            dbname=params["dbname"], user=params.get("user"), host=params.get("host"), port=params.get("port"),
            password=params.get("password"))
        with ConnectionPool(conninfo, min_size=1, max_size=1, timeout=0.2) as pool:
            with pool.connection():
                with pytest.raises(psycopg.OperationalError) as raised:
                    pool.getconn()
        answer = db_errors.explain(raised.value)
        assert answer.code == "busy" and "no database connection was free" in answer.detail

    def test_retrying_gives_up_as_busy_after_a_bounded_number_of_tries(self):
        calls = []

        @lock_order.retrying
        def always_changing() -> None:
            calls.append(1)
            raise lock_order.RetryTransaction("changed under its locks")

        with pytest.raises(Busy) as raised:
            always_changing()
        assert len(calls) == lock_order.MAX_TRIES
        assert raised.value.status == 503 and "nothing was changed" in raised.value.detail

    def test_retrying_runs_the_transaction_again_and_keeps_only_the_last_run(self):
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE am_retry_probe (n int)")
        runs = []

        @lock_order.retrying
        def flaky() -> int:
            runs.append(1)
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO am_retry_probe VALUES (%s)", [len(runs)])
            if len(runs) < 3:
                raise lock_order.RetryTransaction("changed under its locks")
            return len(runs)

        try:
            assert flaky() == 3
            with connection.cursor() as cursor:
                cursor.execute("SELECT array_agg(n) FROM am_retry_probe")
                assert cursor.fetchone()[0] == [3], "the rolled-back runs left nothing behind"
        finally:
            with connection.cursor() as cursor:
                cursor.execute("DROP TABLE am_retry_probe")
