"""The queue forms batches as large as its traffic allows: a batch waits for the companions its last round
predicts (clients that just got their images send the next request at once), and never when none are due."""

import threading
import time

from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job, JobStatus
from sd_server.domain.models import CheckpointModel, LoraModel, UserModel
from sd_server.jobs.batching import BatchRules
from sd_server.jobs.queue import JobQueue
from sd_server.jobs.scheduler import FifoScheduler

FILL_WAIT_S = 60.0  # long enough that a test passes only if the queue stops waiting for the right reason
SCHEDULER = FifoScheduler(BatchRules(max_images=4, max_adapters=2))


def job(user: str = "alice", model: UserModel | None = None) -> Job:
    request = Generation("a photo", None, user, 2, 7.5, 64, 64, None, 1, None)
    return Job(request, "demo", 7, synchronous=True, model=model or CheckpointModel(source="demo"))


def enqueue(queue: JobQueue, *jobs: Job) -> None:
    for each in jobs:
        queue.admit(each, lambda backlog: None)
        queue.settle(each, enqueue=True)


def finish(queue: JobQueue, batch: list[Job]) -> None:
    for each in batch:
        queue.under_lock(lambda each=each: queue.end(each, JobStatus.succeeded))


def ready(model: object) -> bool:
    return True


def test_after_a_round_of_four_a_batch_waits_for_the_four_clients_to_come_back():
    queue = JobQueue(SCHEDULER, max_batch_images=4, batch_wait_s=0.0, batch_fill_wait_s=FILL_WAIT_S)
    enqueue(queue, *(job(user) for user in "abcd"))
    first_round = queue.take_batch(ready, wait_s=0)
    finish(queue, first_round)
    enqueue(queue, job("a"))  # one client is back; the other three follow, each a little later

    def come_back() -> None:
        for user in "bcd":
            time.sleep(0.05)
            enqueue(queue, job(user))

    returning = threading.Thread(target=come_back)
    returning.start()
    second_round = queue.take_batch(ready, wait_s=0)
    returning.join()

    assert len(first_round) == 4
    assert [each.user_id for each in second_round] == ["a", "b", "c", "d"]


def test_a_lone_client_never_waits_for_companions_that_are_not_due():
    queue = JobQueue(SCHEDULER, max_batch_images=4, batch_wait_s=0.0, batch_fill_wait_s=FILL_WAIT_S)
    enqueue(queue, job())
    finish(queue, queue.take_batch(ready, wait_s=0))
    enqueue(queue, job())

    started = time.monotonic()
    batch = queue.take_batch(ready, wait_s=0)

    assert len(batch) == 1
    assert time.monotonic() - started < FILL_WAIT_S / 2, "the batch waited for companions that no round predicted"


def test_when_the_predicted_companions_do_not_come_the_batch_runs_after_the_fill_wait():
    queue = JobQueue(SCHEDULER, max_batch_images=4, batch_wait_s=0.0, batch_fill_wait_s=0.2)
    enqueue(queue, job("a"), job("b"))
    finish(queue, queue.take_batch(ready, wait_s=0))
    enqueue(queue, job("a"))  # b's client has stopped

    started = time.monotonic()
    batch = queue.take_batch(ready, wait_s=0)

    assert len(batch) == 1 and time.monotonic() - started >= 0.2


def test_companions_the_rules_keep_out_do_not_hold_a_batch_back():
    one_lora_a_batch = FifoScheduler(BatchRules(max_images=4, max_adapters=2, across_adapters=False))
    queue = JobQueue(one_lora_a_batch, max_batch_images=4, batch_wait_s=0.0, batch_fill_wait_s=FILL_WAIT_S)
    alice, bob = (LoraModel(base="demo", source=f"loras/{name}.safetensors", scale=1.0) for name in ("alice", "bob"))
    enqueue(queue, job("alice", alice), job("bob", bob))
    finish(queue, queue.take_batch(ready, wait_s=0))  # alice's; bob's waits, and the shape's demand is 2

    started = time.monotonic()
    batch = queue.take_batch(ready, wait_s=0)

    assert [each.user_id for each in batch] == ["bob"]
    assert time.monotonic() - started < FILL_WAIT_S / 2, "the batch waited for a companion that cannot join it"
