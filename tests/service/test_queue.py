"""The job queue on a fake engine: admission, batching rules, cancel, timeouts, restart recovery and failures,
each in milliseconds and without torch. The fake engine's gates hold a step or a load until the test opens them."""

import base64
import io
import threading
import time
from dataclasses import replace

from fastapi.testclient import TestClient
from PIL import Image

from fakes import FakeEngine
from helpers import parse_sse, poll, post_job, wait_for
from sd_server.domain.generation import Generation
from sd_server.domain.jobs import Job, JobStatus
from sd_server.domain.models import CheckpointModel
from sd_server.errors import ModelLoadError
from sd_server.persistence.database import create_database_engine, migrate
from sd_server.persistence.job_store import SqlJobStore


def hold_loads(engine: FakeEngine) -> threading.Event:
    """Models load only once the returned event is set: jobs queue up meanwhile, and then batch together."""
    engine.load_gate = threading.Event()
    return engine.load_gate


def test_jobs_of_one_shape_are_batched_up_to_max_batch_size(settings, app_factory, engine, gated, small_request):
    settings.max_batch_size = 3
    with TestClient(app_factory(settings)) as client:
        first = post_job(client, small_request)
        wait_for(client, first, "running")
        later = [post_job(client, small_request, seed=seed) for seed in range(2, 6)]
        gated.release(1000)
        jobs = [wait_for(client, job_id) for job_id in [first, *later]]

    assert engine.batch_sizes() == [1, 3, 1]
    assert [job["batch_size"] for job in jobs] == [1, 3, 3, 3, 1]
    assert all(job["status"] == "succeeded" for job in jobs)


def test_jobs_differing_in_shape_steps_guidance_sampler_or_model_are_not_batched(settings, app_factory, engine, gated, small_request):
    with TestClient(app_factory(settings)) as client:
        first = post_job(client, small_request)
        wait_for(client, first, "running")
        variants = [{"num_inference_steps": 3}, {"width": 264}, {"guidance_scale": 5.0}, {"scheduler": "ddim"}, {"user_id": "bob"}]
        others = [post_job(client, small_request, **variant) for variant in variants]
        gated.release(1000)
        jobs = [wait_for(client, job_id) for job_id in [first, *others]]

    assert engine.batch_sizes() == [1] * 6 and all(job["status"] == "succeeded" for job in jobs)


def lora(name: str, base: str = "demo") -> dict:
    """A user model: the LoRA ``name`` on ``base``."""
    return {"kind": "lora", "base": base, "source": f"loras/{name}.safetensors"}


def run_queued_behind_one(settings, app_factory, gated, small_request, users: list[str]) -> list[dict]:
    """Run a default-user job, queue one job per user behind it while it runs, then let all finish."""
    with TestClient(app_factory(settings)) as client:
        first = post_job(client, small_request)
        wait_for(client, first, "running")
        later = [post_job(client, small_request, user_id=user) for user in users]
        gated.release(1000)
        return [wait_for(client, job_id) for job_id in [first, *later]]


def test_jobs_of_different_loras_and_checkpoint_users_on_one_base_share_a_batch(settings, app_factory, engine, gated, small_request):
    settings.user_models = {**settings.user_models, "ann": lora("ann"), "ben": lora("ben"), "cy": lora("cy", base="demo2")}
    settings.max_batch_size = 8

    jobs = run_queued_behind_one(settings, app_factory, gated, small_request, ["ann", "ben", "alice", "cy", "ann"])

    assert engine.batch_sizes() == [1, 4, 1]
    key, items = engine.batches[1]
    assert key.base == "demo"
    assert [item.model.label for item in items] == ["demo+loras/ann.safetensors", "demo+loras/ben.safetensors", "demo", "demo+loras/ann.safetensors"]
    assert engine.batches[2][0].base == "demo2" and all(job["status"] == "succeeded" for job in jobs)


def test_a_batch_holds_no_more_distinct_loras_than_sd_max_adapters(settings, app_factory, engine, gated, small_request):
    settings.user_models = {**settings.user_models, **{name: lora(name) for name in ("ann", "ben", "cy")}}
    settings.max_batch_size, settings.max_adapters = 8, 2

    run_queued_behind_one(settings, app_factory, gated, small_request, ["ann", "ben", "cy", "ann", "alice"])

    assert engine.batch_sizes() == [1, 4, 1]  # ann, ben, ann and alice (no adapter); cy waits for the next batch
    assert [item.model.label for item in engine.batches[2][1]] == ["demo+loras/cy.safetensors"]


def test_with_batching_across_adapters_off_a_batch_holds_one_model(settings, app_factory, engine, gated, small_request):
    settings.user_models = {**settings.user_models, "ann": lora("ann"), "ben": lora("ben")}
    settings.max_batch_size, settings.batch_across_adapters = 8, False

    run_queued_behind_one(settings, app_factory, gated, small_request, ["ann", "ben", "ann", "alice"])

    assert engine.batch_sizes() == [1, 2, 1, 1]  # default; ann twice; ben; alice (demo, queued after the first batch)
    assert [{item.model.label for item in items} for _, items in engine.batches[1:]] == [
        {"demo+loras/ann.safetensors"}, {"demo+loras/ben.safetensors"}, {"demo"}
    ]


def test_a_job_whose_model_is_loading_does_not_hold_up_jobs_whose_model_is_ready(settings, app_factory, engine, small_request):
    engine.loaded.add("demo")
    loads = hold_loads(engine)
    with TestClient(app_factory(settings)) as client:
        cold = post_job(client, small_request, user_id="bob")
        warm = [wait_for(client, post_job(client, small_request, seed=seed)) for seed in (2, 3)]
        cold_then = client.get(f"/jobs/{cold}").json()
        loads.set()
        cold_job = wait_for(client, cold)

    assert [job["status"] for job in warm] == ["succeeded", "succeeded"]
    assert cold_then["status"] == "queued" and cold_job["status"] == "succeeded"


def test_a_full_queue_answers_429_with_retry_after_naming_the_setting(settings, app_factory, gated, small_request):
    settings.max_queue = 2
    with TestClient(app_factory(settings)) as client:
        wait_for(client, post_job(client, small_request), "running")
        queued = [client.post("/jobs", json=small_request()).json() for _ in range(2)]

        refused = client.post("/jobs", json=small_request())
        refused_sync = client.post("/generate", json=small_request())
        gated.release(1000)

    assert [job["position"] for job in queued] == [1, 2]
    assert refused.status_code == refused_sync.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1 and "SD_MAX_QUEUE" in refused.json()["detail"]


def test_a_user_past_the_active_job_cap_gets_429_and_other_users_do_not(settings, app_factory, gated, small_request):
    settings.max_active_jobs_per_user = 2
    with TestClient(app_factory(settings)) as client:
        for _ in range(2):
            post_job(client, small_request)

        refused = client.post("/jobs", json=small_request())
        other_user = client.post("/jobs", json=small_request(user_id="alice"))
        gated.release(1000)

    assert refused.status_code == 429 and "SD_MAX_ACTIVE_JOBS_PER_USER" in refused.json()["detail"]
    assert other_user.status_code == 202


def test_cancelling_a_queued_job_ends_it_without_running_it(settings, app_factory, engine, gated, small_request):
    with TestClient(app_factory(settings)) as client:
        running = post_job(client, small_request)
        wait_for(client, running, "running")
        queued = post_job(client, small_request, prompt="never drawn")

        cancelled = client.post(f"/jobs/{queued}/cancel").json()
        gated.release(1000)
        wait_for(client, running)

    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    assert [item.prompt for _, items in engine.batches for item in items] == ["a photo of sks person"]


def test_cancelling_a_running_job_stops_the_batch_at_its_next_step(settings, app_factory, gated, small_request):
    with TestClient(app_factory(settings)) as client:
        job_id = post_job(client, small_request, num_inference_steps=10)
        gated.release(1)
        poll(lambda: client.get(f"/jobs/{job_id}").json(), lambda job: job["progress"]["step"] == 1, "the first step")

        client.post(f"/jobs/{job_id}/cancel")
        gated.release(1000)
        job = wait_for(client, job_id)

    assert job["status"] == "cancelled" and job["result"] is None
    assert job["progress"]["step"] == 1  # the step after the cancel ended it, and the batch stopped there


def test_cancelling_one_job_of_a_batch_lets_its_companions_finish(settings, app_factory, engine, gated, small_request):
    loads = hold_loads(engine)
    with TestClient(app_factory(settings)) as client:
        first, second = (post_job(client, small_request, seed=seed, num_inference_steps=5) for seed in (1, 2))
        loads.set()
        gated.release(1)
        wait_for(client, first, "running")

        client.post(f"/jobs/{first}/cancel")
        gated.release(1000)
        jobs = [wait_for(client, job_id) for job_id in (first, second)]

    assert [job["status"] for job in jobs] == ["cancelled", "succeeded"]
    assert jobs[1]["batch_size"] == 2 and engine.batch_sizes() == [2]


def test_jobs_past_their_timeout_fail_with_504_running_or_queued(settings, app_factory, gated, small_request):
    settings.job_timeout_s = 0.5
    with TestClient(app_factory(settings)) as client:
        running = post_job(client, small_request)
        wait_for(client, running, "running")
        queued = post_job(client, small_request, num_inference_steps=3)
        poll(time.time, lambda now: now > client.app.state.services.jobs.get(queued).created_at.timestamp() + 0.5, "the deadline")
        gated.release(1000)
        jobs = [wait_for(client, job_id) for job_id in (running, queued)]

    assert [job["status"] for job in jobs] == ["failed", "failed"]
    assert all("SD_JOB_TIMEOUT_S" in job["error"] for job in jobs)
    assert jobs[1]["started_at"] is None


def test_a_failed_batch_of_several_runs_its_jobs_one_by_one(settings, app_factory, engine, small_request):
    engine.failures.append(RuntimeError("the batch was too big"))
    loads = hold_loads(engine)
    with TestClient(app_factory(settings)) as client:
        ids = [post_job(client, small_request, seed=seed) for seed in (1, 2)]
        loads.set()
        jobs = [wait_for(client, job_id) for job_id in ids]

    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    assert engine.batch_sizes() == [2, 1, 1] and [job["batch_size"] for job in jobs] == [1, 1]


def test_a_job_that_fails_alone_answers_500_with_its_request_id_and_only_the_log_has_the_detail(
    settings, app_factory, engine, small_request, caplog
):
    engine.failures.append(RuntimeError("cannot open /srv/secret/weights.bin"))
    with TestClient(app_factory(settings)) as client:
        failed = client.post("/generate", json=small_request(), headers={"X-Request-ID": "trace-7"})
        after = client.post("/generate", json=small_request())

    assert failed.status_code == 500
    assert failed.json()["detail"] == "generation with model 'demo' failed; the server log has the details (request id trace-7)"
    assert "/srv/secret" in caplog.text and after.status_code == 200


def test_a_model_that_cannot_load_fails_only_its_own_jobs_with_503(settings, app_factory, engine, small_request):
    engine.broken["demo2"] = ModelLoadError("could not load model 'demo2'", detail="/srv/models/demo2: OSError")
    with TestClient(app_factory(settings)) as client:
        bobs = wait_for(client, post_job(client, small_request, user_id="bob"))
        sync = client.post("/generate", json=small_request(user_id="bob"))
        defaults = wait_for(client, post_job(client, small_request))

    assert bobs["status"] == "failed" and bobs["error"] == "could not load model 'demo2'"
    assert sync.status_code == 503 and "/srv" not in sync.text
    assert defaults["status"] == "succeeded"


def stored_job(url: str, status: JobStatus, attempts: int) -> Job:
    """A job written to the database as a previous run of the server left it."""
    request = Generation("a photo", None, "default", 2, 7.5, 256, 256, 1, 1, None)
    job = Job(request, "demo", 1, synchronous=False, status=status, attempts=attempts, model=CheckpointModel(source="demo"))
    SqlJobStore(create_database_engine(url)).add(job)
    return job


def test_a_restart_runs_queued_jobs_requeues_a_running_one_once_and_fails_one_interrupted_twice(settings, app_factory, database_url):
    migrate(database_url)
    queued = stored_job(database_url, JobStatus.queued, 0)
    interrupted = stored_job(database_url, JobStatus.running, 0)
    twice = stored_job(database_url, JobStatus.running, 1)
    with TestClient(app_factory(settings)) as client:
        jobs = {job.id: wait_for(client, job.id) for job in (queued, interrupted, twice)}

    assert jobs[queued.id]["status"] == jobs[interrupted.id]["status"] == "succeeded"
    assert jobs[twice.id]["status"] == "failed" and "stopped twice" in jobs[twice.id]["error"]


def test_the_same_idempotency_key_returns_the_same_job_and_another_body_is_409(settings, app_factory, small_request):
    headers = {"Idempotency-Key": "order-42"}
    with TestClient(app_factory(settings)) as client:
        first = client.post("/jobs", json=small_request(), headers=headers).json()
        again = client.post("/jobs", json=small_request(), headers=headers).json()
        other = client.post("/jobs", json=small_request(prompt="another"), headers=headers)
        total = client.get("/jobs").json()["total"]

    assert first["job_id"] == again["job_id"] and total == 1
    assert other.status_code == 409 and "order-42" in other.json()["detail"]


def test_the_event_stream_tells_queued_started_each_step_and_the_end(settings, app_factory, small_request):
    with TestClient(app_factory(settings)) as client:
        job_id = post_job(client, small_request, num_inference_steps=4)
        events = parse_sse(client.get(f"/jobs/{job_id}/events").text)

    names = [name for name, _ in events]
    assert names[0] in ("queued", "started") and names[-1] == "succeeded" and names.count("succeeded") == 1
    assert [data["step"] for name, data in events if name == "progress"] == [1, 2, 3, 4][-names.count("progress") :]
    assert events[-1][1]["result"]["images"][0]["url"].startswith("/images/")


def test_two_submissions_of_one_body_share_a_fingerprint_but_are_two_jobs_without_a_key(settings, app_factory):
    with TestClient(app_factory(settings)) as client:
        queue = client.app.state.services.jobs
        request = Generation("a photo", None, "default", 2, 7.5, 256, 256, None, 1, None)
        first, _ = queue.submit(request, synchronous=False)
        second, _ = queue.submit(replace(request), synchronous=False)

    assert first.fingerprint == second.fingerprint and first.id != second.id


def png_base64(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (256, 256), mode: str = "RGB") -> str:
    """A solid picture as a base64 PNG."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_img2img_jobs_batch_by_mode_and_strength_and_carry_their_own_init_images(settings, app_factory, engine, gated, small_request):
    red, blue = png_base64((200, 30, 30)), png_base64((30, 30, 200))
    with TestClient(app_factory(settings)) as client:
        first = post_job(client, small_request)
        wait_for(client, first, "running")
        same = [post_job(client, small_request, init_image=image, strength=0.5, num_inference_steps=4) for image in (red, blue)]
        queued_total = client.get(f"/jobs/{same[0]}").json()["progress"]["total"]
        other_strength = post_job(client, small_request, init_image=red, strength=1.0, num_inference_steps=4)
        inpaint = post_job(client, small_request, init_image=red, mask_image=png_base64((255, 0, 0), mode="L"), strength=0.5, num_inference_steps=4)
        gated.release(1000)
        jobs = [wait_for(client, job_id) for job_id in [first, *same, other_strength, inpaint]]

    assert engine.batch_sizes() == [1, 2, 1, 1] and all(job["status"] == "succeeded" for job in jobs)
    key, items = engine.batches[1]
    assert (key.mode.value, key.strength) == ("img2img", 0.5)
    assert [Image.open(io.BytesIO(item.source.init_png)).getpixel((0, 0)) for item in items] == [(200, 30, 30), (30, 30, 200)]
    assert engine.batches[3][0].mode.value == "inpaint" and engine.batches[3][1][0].source.mask_png
    assert queued_total == jobs[1]["progress"]["total"] == 2  # int(4 x 0.5) steps run
    assert jobs[1]["result"]["parameters"] | {"mode": "img2img", "strength": 0.5} == jobs[1]["result"]["parameters"]


def test_a_long_prompt_does_not_share_a_batch_with_short_ones(settings, app_factory, engine, gated, small_request):
    with TestClient(app_factory(settings)) as client:
        first = post_job(client, small_request)
        wait_for(client, first, "running")
        jobs = [post_job(client, small_request, prompt=prompt) for prompt in ("short", "word " * 100, "also short")]
        gated.release(1000)
        for job_id in jobs:
            wait_for(client, job_id)

    assert engine.batch_sizes() == [1, 2, 1]
    assert [key.prompt_chunks for key, _ in engine.batches] == [1, 1, 2]


def test_a_restart_runs_a_queued_img2img_job_from_its_stored_init_image(settings, app_factory, engine, gated, small_request):
    with TestClient(app_factory(settings)) as client:
        first = post_job(client, small_request)
        wait_for(client, first, "running")
        queued = post_job(client, small_request, init_image=png_base64((10, 200, 10)), strength=0.5, num_inference_steps=4)
        stored_keys = client.app.state.services.jobs.get(queued).input_keys
        client.app.state.services.dispatcher.close()  # the queued job stays queued in the database
        gated.release(1000)
    assert (settings.output_dir / stored_keys["init"]).is_file()
    engine.batches.clear()
    with TestClient(app_factory(settings)) as client:
        job = wait_for(client, queued)
        client.delete(f"/jobs/{queued}")

    assert job["status"] == "succeeded"
    assert Image.open(io.BytesIO(engine.batches[-1][1][0].source.init_png)).getpixel((0, 0)) == (10, 200, 10)
    assert not (settings.output_dir / stored_keys["init"]).exists()  # deleted with its job
