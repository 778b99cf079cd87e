"""The scheduler's FairQueue on its own: waiting jobs served round robin across client addresses, a job that could
not start put back at the head, a job taken out (an abort), the queue read in the order it will run, and cleared."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koboldlite.generation import GenerationRequest
from koboldlite.jobs import Job
from koboldlite.scheduler import FairQueue


def job(client: str, name: str = "") -> Job:
    j = Job(GenerationRequest(prompt=name or client, client=client), [], 1)
    j.name = name or client
    return j


def queue_of(*names: str) -> tuple[FairQueue, dict[str, Job]]:
    """Jobs named like "a1" (client "a"), appended in the order given."""
    q, jobs = FairQueue(), {}
    for n in names:
        jobs[n] = job(n[0], n)
        q.append(jobs[n])
    return q, jobs


def names(jobs) -> list[str]:
    return [j.name for j in jobs]


def drain(q: FairQueue) -> list[str]:
    out = []
    while q:
        out.append(q.popleft().name)
    return out


def test_an_empty_queue():
    q = FairQueue()
    assert len(q) == 0 and not q and list(q) == [] and q.clear() == []


def test_one_clients_burst_waits_behind_every_other_clients_next_request():
    q, _ = queue_of("a1", "a2", "a3", "a4", "b1", "c1", "c2")
    assert len(q) == 7 and q
    assert drain(q) == ["a1", "b1", "c1", "a2", "c2", "a3", "a4"]
    assert len(q) == 0 and not q


def test_one_client_alone_is_served_in_its_own_order():
    q, _ = queue_of("a1", "a2", "a3")
    assert drain(q) == ["a1", "a2", "a3"]


def test_a_client_that_comes_back_goes_to_the_back():
    q, _ = queue_of("a1", "b1")
    assert q.popleft().name == "a1"              # a has nothing waiting now: its turn is gone
    q.append(job("a", "a2"))
    q.append(job("c", "c1"))
    assert names(q) == ["b1", "a2", "c1"] == drain(q)


def test_iteration_is_the_order_they_will_run_and_does_not_change_the_queue():
    q, _ = queue_of("a1", "a2", "b1", "a3", "c1", "b2")
    order = names(q)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert names(q) == order and len(q) == 6
    assert drain(q) == order


def test_push_front_puts_a_job_back_at_the_head():
    q, jobs = queue_of("a1", "b1", "b2", "c1")
    assert q.popleft() is jobs["a1"]
    q.push_front(jobs["a1"])
    assert len(q) == 4 and names(q) == ["a1", "b1", "c1", "b2"]
    # Another client's job put at the head goes first, ahead of its own client's turn in the round.
    other = job("c", "c0")
    q.push_front(other)
    assert q.popleft() is other and len(q) == 4


def test_jobs_taken_to_start_and_put_back_in_reverse_keep_their_places():
    """What the scheduler does when the engine has no room for them yet."""
    q, _ = queue_of("a1", "a2", "b1", "b2", "c1")
    before = names(q)
    taken = [q.popleft() for _ in range(3)]
    assert names(taken) == ["a1", "b1", "c1"]
    for j in reversed(taken):
        q.push_front(j)
    assert names(q) == before and len(q) == 5


def test_remove_takes_one_job_out_and_keeps_the_rest_in_turn():
    q, jobs = queue_of("a1", "a2", "b1", "b2", "c1")
    q.remove(jobs["b1"])
    assert len(q) == 4 and names(q) == ["a1", "b2", "c1", "a2"]
    q.remove(jobs["c1"])                         # c's last job: c has no turn any more
    assert len(q) == 3 and names(q) == ["a1", "b2", "a2"]
    q.remove(jobs["a1"])
    assert names(q) == ["a2", "b2"] == drain(q)


def test_removing_a_job_that_is_not_waiting_changes_nothing():
    q, jobs = queue_of("a1", "b1")
    for stranger in (job("a", "a9"), job("z", "z1")):      # a waiting client's, and an unknown client's
        with pytest.raises((KeyError, ValueError)):
            q.remove(stranger)
        assert len(q) == 2 and names(q) == ["a1", "b1"]


def test_clear_gives_back_every_job_in_run_order_and_empties_the_queue():
    q, _ = queue_of("a1", "a2", "b1")
    assert names(q.clear()) == ["a1", "b1", "a2"]
    assert len(q) == 0 and not q and list(q) == []
    q.append(job("c", "c1"))                     # and it is usable again
    assert drain(q) == ["c1"]


# -- properties, over any sequence of clients' requests ------------------------------------------------------

clients = st.lists(st.sampled_from("abcd"), max_size=14)


def filled(order: list[str]) -> FairQueue:
    q, counts = FairQueue(), {}
    for c in order:
        counts[c] = counts.get(c, 0) + 1
        q.append(job(c, f"{c}{counts[c]}"))
    return q


@settings(max_examples=300, deadline=None, database=None)
@given(order=clients, pops=st.integers(0, 14))
def test_the_iteration_order_is_the_order_popleft_serves(order, pops):
    q = filled(order)
    for _ in range(min(pops, len(order))):
        q.popleft()
    promised = names(q)
    assert len(q) == len(promised) == len(order) - min(pops, len(order))
    assert drain(q) == promised


@settings(max_examples=300, deadline=None, database=None)
@given(order=clients)
def test_each_client_is_served_in_its_own_order_and_no_client_waits_two_rounds(order):
    served = drain(filled(order))
    assert sorted(served) == sorted(f"{c}{k}" for c in set(order) for k in range(1, order.count(c) + 1))
    for c in set(order):
        mine = [s for s in served if s[0] == c]
        assert mine == [f"{c}{k}" for k in range(1, len(mine) + 1)]
    # Between two jobs of one client, each other client that still has jobs waiting gets one turn at most.
    for i, a in enumerate(served):
        j = next((k for k in range(i + 1, len(served)) if served[k][0] == a[0]), None)
        if j is not None:
            between = [s[0] for s in served[i + 1:j]]
            assert len(between) == len(set(between))


@settings(max_examples=300, deadline=None, database=None)
@given(order=st.lists(st.sampled_from("abcd"), min_size=1, max_size=14), data=st.data())
def test_any_jobs_taken_and_put_back_in_reverse_restore_the_order(order, data):
    q = filled(order)
    before = names(q)
    k = data.draw(st.integers(1, len(order)))
    taken = [q.popleft() for _ in range(k)]
    assert names(taken) == before[:k]
    for j in reversed(taken):
        q.push_front(j)
    assert names(q) == before and len(q) == len(order)
