"""Fair to every tenant, through the API on a fake engine: a user with nothing queued gets into a queue that heavy
users filled and runs ahead of their backlogs, keys carry a weight and a priority class, and POST /jobs may ask for
batch priority."""

from fastapi.testclient import TestClient

from helpers import post_job, wait_for

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_a_user_with_nothing_queued_gets_into_a_queue_heavy_users_filled_and_runs_before_their_backlog(
    settings, app_factory, gated, small_request
):
    settings.max_queue, settings.queue_reserve, settings.max_batch_size = 3, 1, 1
    with TestClient(app_factory(settings)) as client:
        wait_for(client, post_job(client, small_request), "running")
        heavy = [post_job(client, small_request, user_id=user, seed=seed) for user, seed in (("alice", 1), ("alice", 2), ("default", 3))]
        refused = client.post("/jobs", json=small_request(user_id="alice", seed=4))
        light = client.post("/jobs", json=small_request(user_id="bob"))
        past_reserve = client.post("/jobs", json=small_request(user_id="bob", seed=5))
        gated.release(1000)
        finished = {job_id: wait_for(client, job_id) for job_id in [*heavy, light.json()["job_id"]]}

    assert refused.status_code == 429 and "SD_MAX_QUEUE" in refused.json()["detail"] and int(refused.headers["Retry-After"]) >= 1
    assert light.status_code == 202 and light.json()["position"] == 2  # behind alice's first job, before her second
    assert past_reserve.status_code == 429
    light_start = finished[light.json()["job_id"]]["started_at"]
    assert light_start < finished[heavy[1]]["started_at"] and all(job["status"] == "succeeded" for job in finished.values())


def test_keys_carry_a_weight_and_a_priority_class_that_their_jobs_run_with(settings, app_factory, gated, small_request):
    settings.admin_key, settings.max_batch_size = ADMIN_KEY, 1
    with TestClient(app_factory(settings)) as client:
        created = client.post("/keys", json={"user_id": "alice", "weight": 2, "priority": "batch"}, headers=ADMIN).json()
        listed = next(key for key in client.get("/keys", headers=ADMIN).json() if key["id"] == created["id"])
        alice = {"Authorization": f"Bearer {created['key']}"}
        wait_for(client, client.post("/jobs", json=small_request(), headers=ADMIN).json()["job_id"], "running", headers=ADMIN)
        bulk = client.post("/jobs", json=small_request(priority="interactive"), headers=alice).json()  # a batch key stays batch
        interactive = client.post("/jobs", json=small_request(seed=2), headers=ADMIN).json()
        asked_batch = client.post("/jobs", json=small_request(seed=3, priority="batch"), headers=ADMIN).json()
        bulk_now = client.get(f"/jobs/{bulk['job_id']}", headers=alice).json()
        gated.release(1000)

    assert (created["weight"], created["priority"]) == (listed["weight"], listed["priority"]) == (2.0, "batch")
    assert (bulk["position"], interactive["position"], asked_batch["position"]) == (1, 1, 3)
    assert bulk_now["priority"] == "batch" and bulk_now["position"] == 2  # the interactive job went ahead of it


def test_a_key_weight_must_be_positive(settings, app_factory):
    settings.admin_key = ADMIN_KEY
    with TestClient(app_factory(settings)) as client:
        refused = client.post("/keys", json={"user_id": "alice", "weight": 0}, headers=ADMIN)

    assert refused.status_code == 422 and "weight" in str(refused.json()["detail"])


def test_health_and_metrics_show_queue_depth_per_user_wait_times_and_each_tenant_share(settings, app_factory, gated, small_request):
    settings.max_batch_size = 1
    with TestClient(app_factory(settings)) as client:
        wait_for(client, post_job(client, small_request), "running")
        queued = [post_job(client, small_request, user_id=user, seed=seed) for user, seed in (("alice", 1), ("alice", 2), ("bob", 3))]
        while_queued = client.get("/health").json()["queue"]
        metrics_queued = client.get("/metrics").text
        gated.release(1000)
        for job_id in queued:
            wait_for(client, job_id)
        after = client.get("/health").json()["queue"]
        metrics_after = client.get("/metrics").text

    assert while_queued["queued_by_user"] == {"alice": 2, "bob": 1} and while_queued["scheduling"] == "fair"
    assert 'sd_queue_depth_by_user{user="alice"} 2.0' in metrics_queued
    assert after["queued_by_user"] == {} and after["tenant_shares"] == {"default": 0.25, "alice": 0.5, "bob": 0.25}
    assert 'sd_tenant_share{tenant="alice"} 0.5' in metrics_after
    assert 'sd_job_wait_seconds_count{priority="interactive"} 4.0' in metrics_after
