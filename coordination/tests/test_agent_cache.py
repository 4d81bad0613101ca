"""The per-process agent cache: what it keeps, when it must not be trusted, and the requests it saves."""

import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from coordination import agent_cache, notify
from coordination.models import Agent
from coordination.services import agent_registry, tokens


def _agent(name: str = "a") -> Agent:
    """An agent row as the database would hand it (not saved: the cache never writes)."""
    token_hash = tokens.token_hash(f"am_{name}")
    return Agent(id=uuid.uuid4(), name=name, roles=["developer"], capacity=1, token_hash=token_hash,
                 token_prefix="am_", enabled=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def connected():
    event = threading.Event()
    event.set()
    return event


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(connected, clock):
    """A cache of its own, with a `connected` flag and a clock the test moves."""
    return agent_cache.AgentCache(connected=connected, max_entries=3, max_age_s=60, clock=clock)


def _put(cache, agent) -> bool:
    return cache.put(agent.token_hash, agent, generation=cache.generation)


class AgentCacheTests:
    def test_it_hands_each_caller_a_copy_of_its_own(self, cache):
        agent = _agent()
        assert _put(cache, agent)
        agent.roles.append("changed-after-put")
        first, second = cache.get(agent.token_hash), cache.get(agent.token_hash)
        first.roles.append("tester")
        first.enabled = False
        assert first is not second
        assert second.roles == ["developer"] and second.enabled
        assert cache.get(agent.token_hash).roles == ["developer"]

    def test_it_keeps_nothing_read_before_an_invalidation(self, cache):
        agent = _agent()
        generation = cache.generation  # a request is about to read the row ...
        cache.forget(agent.id)  # ... the agent changes and the notification is handled meanwhile ...
        assert not cache.put(agent.token_hash, agent, generation=generation)  # ... the stale row is not kept
        assert cache.get(agent.token_hash) is None
        assert _put(cache, agent)  # a read after the change is
        assert cache.get(agent.token_hash) is not None

    def test_it_drops_only_the_agent_it_is_told_of(self, cache):
        changed, other = _agent("changed"), _agent("other")
        _put(cache, changed)
        _put(cache, other)
        cache.forget(str(changed.id))  # as a notification's payload: the id as text
        assert cache.get(changed.token_hash) is None
        assert cache.get(other.token_hash).id == other.id

    def test_it_is_not_trusted_while_the_listener_is_disconnected(self, cache, connected):
        agent = _agent()
        _put(cache, agent)
        connected.clear()
        assert cache.get(agent.token_hash) is None
        assert not _put(cache, _agent("b"))
        connected.set()
        assert cache.get(_agent("b").token_hash) is None

    def test_it_keeps_at_most_max_entries_dropping_the_least_recently_used(self, cache):
        a, b, c, d = (_agent(name) for name in "abcd")
        for agent in (a, b, c):
            _put(cache, agent)
        cache.get(a.token_hash)
        _put(cache, d)
        assert len(cache) == 3
        assert cache.get(b.token_hash) is None
        assert all(cache.get(agent.token_hash) is not None for agent in (a, c, d))

    def test_an_entry_is_read_again_past_its_max_age(self, cache, clock):
        agent = _agent()
        _put(cache, agent)
        clock.now += 59
        assert cache.get(agent.token_hash) is not None
        clock.now += 2
        assert cache.get(agent.token_hash) is None
        assert len(cache) == 0

    def test_it_keeps_the_last_seen_time_it_is_told(self, cache):
        agent = _agent()
        _put(cache, agent)
        at = timezone.now()
        cache.seen(token_hash=agent.token_hash, at=at)
        assert cache.get(agent.token_hash).last_seen_at == at

    def test_unknown_tokens_are_not_kept(self, monkeypatch, cache):
        monkeypatch.setattr(agent_cache, "cache", cache)
        monkeypatch.setattr(notify.listener, "ensure_started", lambda: None)
        loads = []

        def load(token_hash):
            loads.append(token_hash)
            return None

        assert agent_cache.read_through("unknown", load) is None
        assert agent_cache.read_through("unknown", load) is None
        assert loads == ["unknown", "unknown"] and len(cache) == 0

    def test_a_row_read_while_a_notification_is_handled_is_not_kept(self, monkeypatch, cache):
        monkeypatch.setattr(agent_cache, "cache", cache)
        monkeypatch.setattr(notify.listener, "ensure_started", lambda: None)
        agent = _agent()

        def load_then_change(token_hash):
            cache.forget(agent.id)  # the listener thread handles the change's notification during the read
            return agent

        assert agent_cache.read_through(agent.token_hash, load_then_change).id == agent.id
        assert cache.get(agent.token_hash) is None


@pytest.fixture
def listening():
    """The process's listener, connected (the session fixture connects it): the agent cache is in use."""
    assert notify.listener.connected.wait(timeout=10), "the notification listener is not connected"
    return notify.listener


def _agent_reads(queries) -> int:
    return sum("a.token_hash =" in query["sql"] for query in queries.captured_queries)


def _seen_writes(queries) -> int:
    return sum('SET "last_seen_at"' in query["sql"] for query in queries.captured_queries)


@pytest.mark.django_db
class CachedAuthenticationTests:
    def test_a_second_request_of_an_agent_reads_no_agent_row(self, listening, developer):
        client = developer.client()
        with CaptureQueriesContext(connection) as first:
            assert client.get("/v1/tasks/developer/ready").status_code == 204
        with CaptureQueriesContext(connection) as second:
            assert client.get("/v1/tasks/developer/ready").status_code == 204
        assert (_agent_reads(first), _agent_reads(second)) == (1, 0)

    def test_last_seen_is_still_written_at_most_every_few_seconds(self, listening, developer, monkeypatch):
        client = developer.client()
        counts = []
        start = timezone.now()
        for seconds_later in (0, 1, agent_registry.AGENT_SEEN_TOUCH_S + 1, agent_registry.AGENT_SEEN_TOUCH_S + 2):
            at = start + timedelta(seconds=seconds_later)
            monkeypatch.setattr(agent_registry.timezone, "now", lambda at=at: at)
            with CaptureQueriesContext(connection) as queries:
                assert client.get("/v1/tasks/developer/ready").status_code == 204
            counts.append((_agent_reads(queries), _seen_writes(queries)))
        # Read and touched once; then from the cache, touched again only once the interval has passed.
        assert counts == [(1, 1), (0, 0), (0, 1), (0, 0)]

    def test_the_cache_is_bypassed_while_the_listener_is_disconnected(self, listening, developer, monkeypatch):
        client = developer.client()
        assert client.get("/v1/tasks/developer/ready").status_code == 204  # cached
        monkeypatch.setattr(agent_cache.cache, "_connected", threading.Event())  # the listener lost its connection
        with CaptureQueriesContext(connection) as queries:
            for _ in range(3):
                assert client.get("/v1/tasks/developer/ready").status_code == 204
        assert _agent_reads(queries) == 3

    def test_a_disabled_agent_is_refused_at_once_and_enabled_again_at_once(self, listening, developer):
        client = developer.client()
        assert client.get("/v1/agents/me").status_code == 200
        agent_registry.agent_set_enabled(agent_id=developer.agent.id, enabled=False)
        response = client.get("/v1/agents/me")
        assert response.status_code == 401 and "disabled" in response.json()["detail"]
        agent_registry.agent_set_enabled(agent_id=developer.agent.id, enabled=True)
        assert client.get("/v1/agents/me").status_code == 200

    def test_a_rotated_token_is_refused_at_once_and_the_new_one_accepted(self, listening, developer):
        old = developer.client()
        assert old.get("/v1/agents/me").status_code == 200
        token = agent_registry.agent_rotate_token(agent=developer.agent)
        response = old.get("/v1/agents/me")
        assert response.status_code == 401 and "Unknown token" in response.json()["detail"]
        new = APIClient()
        new.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        assert new.get("/v1/agents/me").json()["id"] == str(developer.agent.id)

    def test_a_role_taken_away_in_the_admin_form_applies_to_the_next_request(self, listening, developer):
        client = developer.client()
        assert client.get("/v1/tasks/developer/ready").status_code == 204
        agent_registry.agent_update(agent_id=developer.agent.id, name="dev-1", roles=["tester"], capacity=2,
                                    can_submit=False, enabled=True)
        assert client.get("/v1/tasks/developer/ready").status_code == 403

    def test_user_tokens_are_not_cached(self, listening, owner):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens.user_token_create(user=owner, name='ci')}")
        before = len(agent_cache.cache)
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/v1/workflows").status_code == 200
            assert client.get("/v1/workflows").status_code == 200
        assert sum(query["sql"].startswith("SELECT") and 'FROM "coordination_usertoken"' in query["sql"]
                   for query in queries.captured_queries) == 2
        assert len(agent_cache.cache) == before


class ReconnectTests:
    def test_a_reconnect_empties_the_cache_before_it_is_trusted_again(self):
        """A real listener whose connection is killed: notifications may have been missed, so nothing is kept."""
        listener = notify.Listener()
        cache = agent_cache.AgentCache(connected=listener.connected)
        listener.subscribe(notify.AGENTS, cache.forget)
        name = f"am-test-listener-{uuid.uuid4().hex[:8]}"
        conninfo = listener._conninfo()
        listener._conninfo = lambda: {**conninfo, "application_name": name}
        listener.ensure_started()
        try:
            assert listener.connected.wait(timeout=10)
            agent = _agent()
            generation = cache.generation
            assert cache.put(agent.token_hash, agent, generation=generation)
            with psycopg.connect(**conninfo, autocommit=True) as admin:
                killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE application_name = %s", [name]).fetchone()[0]
            assert killed == 1
            deadline = time.monotonic() + 10
            while listener.connected.is_set() and cache.get(agent.token_hash) is not None:
                assert time.monotonic() < deadline, "the listener did not notice its connection was killed"
                time.sleep(0.05)
            assert listener.connected.wait(timeout=10), "the listener did not reconnect"
            assert cache.get(agent.token_hash) is None and len(cache) == 0
            assert not cache.put(agent.token_hash, agent, generation=generation)
        finally:
            listener.stop()


@pytest.mark.django_db(transaction=True)
class ChangeNotificationTests:
    def test_the_trigger_tells_of_changes_but_not_of_a_pull_or_a_presence_touch(self, developer):
        """What the listener hears from committed changes: the pull counter and `last_seen_at` move on every
        request and would empty the cache as fast as it fills, so they say nothing; anything else does."""
        from coordination.services import lock_order

        params = notify.listener._conninfo()
        agent = developer.agent
        with psycopg.connect(**params, autocommit=True) as listening:
            listening.execute(f"LISTEN {notify.AGENTS}")
            lock_order.lock_agent(agent.id)  # a pull's bump of pull_seq (autocommit: committed)
            Agent.objects.filter(id=agent.id).update(last_seen_at=timezone.now())
            assert [note.payload for note in listening.notifies(timeout=0.5)] == []
            agent_registry.agent_update(agent_id=agent.id, name=agent.name, roles=agent.roles, capacity=3,
                                        can_submit=False, enabled=True)
            assert [note.payload for note in listening.notifies(timeout=5, stop_after=1)] == [str(agent.id)]
