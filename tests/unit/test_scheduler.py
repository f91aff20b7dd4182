"""The FIFO scheduler, called as the pure function it is: which job leads, which join it, what loads next, and
when a training gets the device."""

from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job
from sd_server.domain.models import CheckpointModel, LoraModel, UserModel
from sd_server.jobs.batching import BatchRules
from sd_server.jobs.scheduler import DeviceUsage, FifoScheduler, Turn

SCHEDULER = FifoScheduler(BatchRules(max_images=4, max_adapters=2))


def job(user: str = "alice", model: UserModel | None = None, width: int = 64, images: int = 1) -> Job:
    request = Generation("a photo", None, user, 2, 7.5, width, 64, None, images, None)
    return Job(request, "demo", 7, synchronous=False, model=model or CheckpointModel(source="demo"))


def lora(name: str, base: str = "demo") -> LoraModel:
    return LoraModel(base=base, source=f"loras/{name}.safetensors", scale=1.0)


def ready_except(*sources: str):
    return lambda model: model.source not in sources


def test_the_oldest_job_whose_model_is_ready_leads_and_jobs_whose_model_loads_wait_without_holding_others():
    loading, ready = job(model=CheckpointModel(source="demo2")), job()

    assert SCHEDULER.lead([loading, ready], ready_except("demo2")) is ready
    assert SCHEDULER.lead([loading], ready_except("demo2")) is None


def test_a_batch_takes_compatible_jobs_in_queue_order_up_to_the_image_cap():
    first, other_shape, big, second, third = job(), job(width=128), job(images=3), job(user="bob"), job(user="carol")

    assert SCHEDULER.batch(first, [first, other_shape, big, second, third]) == [first, big]
    assert SCHEDULER.batch(second, [second, third]) == [second, third]


def test_a_batch_mixes_loras_of_one_base_up_to_the_adapter_cap():
    jobs = [job(model=lora(name)) for name in ("a", "b", "c")] + [job(model=lora("a"))]

    assert SCHEDULER.batch(jobs[0], jobs) == [jobs[0], jobs[1], jobs[3]]


def test_the_next_load_is_the_first_queued_job_that_needs_one_keeping_the_bases_ahead_of_it():
    running, ahead, needs = job(model=CheckpointModel(source="demo3")), job(), job(model=CheckpointModel(source="demo2"))

    target = SCHEDULER.model_to_load([ahead, needs], [running], lambda model: model.source == "demo2")

    assert target is not None and target.model == needs.model and target.keep == {"demo3", "demo"}
    assert SCHEDULER.model_to_load([ahead], [running], lambda model: False) is None


def test_without_a_training_share_a_ready_batch_goes_before_a_training_slice_and_an_idle_device_trains():
    assert SCHEDULER.turn(batch_ready=True, training_waiting=True, training_share=0.0) is Turn.batch
    assert SCHEDULER.turn(batch_ready=False, training_waiting=True, training_share=1.0) is Turn.training
    assert SCHEDULER.turn(batch_ready=False, training_waiting=False, training_share=0.0) is Turn.idle


def test_trainings_get_their_share_of_a_busy_device_and_no_more():
    shared = FifoScheduler(BatchRules(max_images=4, max_adapters=2), training_share=0.25)

    assert shared.turn(batch_ready=True, training_waiting=True, training_share=0.1) is Turn.training
    assert shared.turn(batch_ready=True, training_waiting=True, training_share=0.3) is Turn.batch
    assert shared.turn(batch_ready=True, training_waiting=False, training_share=0.0) is Turn.batch


def test_device_usage_gives_the_share_of_recent_device_time_spent_training():
    usage = DeviceUsage(half_life_s=60.0)
    shared = FifoScheduler(BatchRules(max_images=4, max_adapters=2), training_share=0.25)
    for _ in range(400):  # a busy device: a batch is always ready; a batch takes 2 s, a slice 1 s
        turn = shared.turn(batch_ready=True, training_waiting=True, training_share=usage.training_share)
        usage.record(turn is Turn.training, 1.0 if turn is Turn.training else 2.0)

    assert abs(usage.training_share - 0.25) < 0.03
    assert DeviceUsage().training_share == 0.0


def test_jobs_of_one_call_shape_share_a_batch_shape_unless_their_models_may_not_mix():
    alice, bob, wide = job(model=lora("alice")), job(model=lora("bob")), job(model=lora("alice"), width=128)
    apart = FifoScheduler(BatchRules(max_images=4, max_adapters=2, across_adapters=False))

    assert SCHEDULER.shape(alice) == SCHEDULER.shape(bob) != SCHEDULER.shape(wide)
    assert apart.shape(alice) != apart.shape(bob)
