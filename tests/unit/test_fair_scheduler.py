"""The fair scheduler, called as the pure function it is: users share the device in proportion to their weights,
by cost (pixel-steps), whatever each has queued; interactive jobs lead before batch ones; an idle user comes back
at the system's virtual time; batches still take every compatible job."""

from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job, Priority
from sd_server.domain.models import CheckpointModel
from sd_server.jobs.batching import BatchRules
from sd_server.jobs.scheduler import FairScheduler, FifoScheduler, Ledger

RULES = BatchRules(max_images=4, max_adapters=2)
FAIR, FIFO = FairScheduler(RULES), FifoScheduler(RULES)


def job(user: str, images: int = 1, weight: float = 1.0, priority: Priority = Priority.interactive, tenant: str = "") -> Job:
    request = Generation("a photo", None, user, 2, 7.5, 64, 64, None, images, None)
    return Job(request, "demo", 7, synchronous=False, model=CheckpointModel(source="demo"), weight=weight, priority=priority, tenant=tenant)


def users(jobs: list[Job]) -> str:
    return "".join(each.user_id for each in jobs)


def test_users_with_equal_demand_take_turns_whatever_order_they_queued_in():
    queued = [job("a") for _ in range(3)] + [job("b") for _ in range(3)]

    assert users(FAIR.order(queued, Ledger())) == "ababab"
    assert users(FIFO.order(queued, Ledger())) == "aaabbb"


def test_a_user_of_weight_two_is_served_twice_as_much():
    queued = [job("a") for _ in range(6)] + [job("b", weight=2) for _ in range(6)]

    first_six = users(FAIR.order(queued, Ledger())[:6])

    assert first_six.count("b") == 4 and first_six.count("a") == 2


def test_cost_counts_images_so_one_job_of_four_images_weighs_as_four_of_one():
    big, small = job("a", images=4), [job("b") for _ in range(5)]

    ordered = FAIR.order([big, job("a"), *small], Ledger())

    assert users(ordered) == "abbbbab"  # after a's four images, b catches up before a's next job


def test_a_light_user_arriving_behind_heavy_backlogs_leads_the_next_batch():
    ledger, queued = Ledger(), [job(user) for user in "abcd" for _ in range(16)]
    for _ in range(3):  # the heavy users have had a few batches
        ordered = FAIR.order(queued, ledger)
        batch = FAIR.batch(FAIR.lead(ordered, lambda model: True), ordered)
        queued = [each for each in queued if each not in batch]
        ledger.charge(batch[0], batch, {each.user_id for each in queued})
    light = job("e")
    ledger.activate("e")

    ordered = FAIR.order([*queued, light], ledger)

    assert FAIR.lead(ordered, lambda model: True) is light
    assert light in FAIR.batch(light, ordered) and FIFO.order([*queued, light], ledger)[-1] is light


def test_an_idle_user_comes_back_at_the_system_virtual_time_without_credit():
    ledger = Ledger(tags={"a": 10.0, "b": 500.0}, now=400.0)

    ledger.activate("a")  # idle since long ago: no credit for it
    ledger.activate("b")  # ahead of the system: keeps its place

    assert ledger.tag("a") == 400.0 and ledger.tag("b") == 500.0 and ledger.tag("new") == 400.0


def test_charging_a_batch_advances_its_users_by_cost_over_weight_and_counts_tenants():
    lead, heavy = job("a", tenant="app"), job("b", images=2, weight=2.0)
    ledger = Ledger()

    ledger.charge(lead, [lead, heavy], active_users={"a"})

    assert ledger.tag("a") == lead.cost and ledger.tags["b"] == heavy.cost / 2
    assert ledger.served == {"app": lead.cost, "b": heavy.cost}


def test_charging_forgets_idle_users_who_are_not_ahead_of_the_system():
    ledger = Ledger(tags={"idle": 1.0, "ahead": 10**9}, now=0.0)
    lead = job("a")

    ledger.charge(lead, [lead], active_users={"a"})
    ledger.charge(lead, [lead], active_users={"a"})

    assert set(ledger.tags) == {"a", "ahead"}


def test_interactive_jobs_lead_before_older_batch_jobs_in_both_schedulers():
    bulk, interactive = job("a", priority=Priority.batch), job("b")

    for scheduler in (FAIR, FIFO):
        assert scheduler.order([bulk, interactive], Ledger()) == [interactive, bulk]


def test_a_fair_batch_takes_two_jobs_of_each_of_two_users_not_four_of_the_oldest():
    queued = [job("a") for _ in range(4)] + [job("b") for _ in range(4)]

    ordered = FAIR.order(queued, Ledger())

    assert users(FAIR.batch(ordered[0], ordered)) == "abab"


def test_backlogged_users_of_weights_one_and_two_get_one_and_two_thirds_of_many_batches():
    rules = BatchRules(max_images=8, max_adapters=2)
    scheduler, ledger = FairScheduler(rules), Ledger()
    queued = [job("light") for _ in range(12)] + [job("heavy", weight=2) for _ in range(12)]
    served = {"light": 0, "heavy": 0}
    for _ in range(30):  # each batch's jobs come straight back, as a client in a closed loop sends its next request
        ordered = scheduler.order(queued, ledger)
        batch = scheduler.batch(ordered[0], ordered)
        ledger.charge(batch[0], batch, {"light", "heavy"})
        queued = [each for each in queued if each not in batch] + [job(each.user_id, weight=each.weight) for each in batch]
        for each in batch:
            served[each.user_id] += 1

    assert abs(served["heavy"] / served["light"] - 2) < 0.05
