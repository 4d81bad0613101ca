"""Which lock requests conflict: modes, directories, the same agent, all or nothing, fencing numbers."""

import pytest

from coordination.errors import LockConflict
from coordination.models import FileLock
from coordination.services import file_locks, pull, workflow_creation
from coordination.tests.agent_calls import acquire

pytestmark = pytest.mark.django_db


def conflicts(agent, paths, mode="write", **extra) -> bool:
    try:
        acquire(agent, paths, mode, **extra)
    except LockConflict:
        return True
    return False


class LockConflictTests:
    @pytest.mark.parametrize(("held", "wanted", "blocked"), [
        ("read", "read", False),
        ("read", "write", True),
        ("write", "read", True),
        ("write", "write", True),
    ])
    def test_it_blocks_by_mode(self, developer, other_developer, held, wanted, blocked):
        acquire(developer, ["src/app.py"], held)
        assert conflicts(other_developer, ["src/app.py"], wanted) is blocked

    @pytest.mark.parametrize(("held", "wanted"), [("src/", "src/app.py"), ("src/app.py", "src/"),
                                                  ("src/", "src/deep/x.py"), ("./", "README.md")])
    def test_it_makes_a_directory_and_what_is_under_it_conflict_both_ways(self, developer, other_developer, held,
                                                                          wanted):
        acquire(developer, [held])
        assert conflicts(other_developer, [wanted])

    def test_it_lets_disjoint_paths_through(self, developer, other_developer):
        acquire(developer, ["src/a.py", "docs/"])
        assert not conflicts(other_developer, ["src/b.py", "docsx/"])

    def test_it_does_not_block_an_agent_with_its_own_lock(self, developer):
        first = acquire(developer, ["src/app.py"])
        second = acquire(developer, ["src/app.py"])
        assert second[0].fencing > first[0].fencing

    def test_it_blocks_the_same_agent_under_another_step(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        leases = [pull.step_pull(agent=developer.agent, roles=["developer"]) for _ in range(2)]
        acquire(developer, ["report.md"], step_id=leases[0].step.id, lease_token=leases[0].token)
        assert conflicts(developer, ["report.md"], step_id=leases[1].step.id, lease_token=leases[1].token)

    def test_it_grants_all_or_nothing(self, developer, other_developer):
        acquire(developer, ["b.txt"])
        with pytest.raises(LockConflict) as info:
            acquire(other_developer, ["a.txt", "b.txt", "c.txt"])
        assert [c["path"] for c in info.value.extra["conflicts"]] == ["b.txt"]
        assert info.value.extra["conflicts"][0]["held_by"] == "dev-1"
        assert not FileLock.objects.filter(agent=other_developer.agent).exists()

    def test_it_grows_the_fencing_number_with_every_grant_of_a_path(self, developer, other_developer):
        numbers = []
        for agent in [developer, other_developer, developer]:
            [lock] = acquire(agent, ["shared.md"])
            numbers.append(lock.fencing)
            file_locks.lock_release(lock_id=lock.id, agent=agent.agent)
        assert numbers == sorted(numbers) and len(set(numbers)) == 3
