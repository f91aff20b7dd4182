"""Per-user models: lazy loading, DELETE /cache, GET /models, unknown users and load failures."""

import json
import threading

from fastapi.testclient import TestClient

from helpers import DEADLINE_S
from sd_server.app import create_app
from sd_server.demo.random_pipeline import save_random_pipeline


def test_first_request_loads_the_model_and_later_ones_hit_the_cache(client, small_request, load_calls):
    for _ in range(3):
        assert client.post("/generate", json=small_request()).status_code == 200

    assert len(load_calls) == 1 and load_calls[0].endswith("demo")
    assert client.get("/health").json()["loaded_models"] == ["demo"]


def test_delete_cache_unloads_every_model_and_the_next_request_loads_again(client, small_request, load_calls):
    client.post("/generate", json=small_request())
    client.post("/generate", json=small_request(user_id="bob"))

    response = client.delete("/cache")

    assert response.status_code == 200
    assert sorted(response.json()["unloaded"]) == ["demo", "demo2"]
    assert client.get("/models").json()["loaded_models"] == []
    client.post("/generate", json=small_request())
    assert len(load_calls) == 3


def test_delete_cache_with_model_id_unloads_only_that_model(client, small_request):
    client.post("/generate", json=small_request())
    client.post("/generate", json=small_request(user_id="bob"))

    assert client.delete("/cache", params={"model_id": "demo2"}).json() == {"unloaded": ["demo2"]}
    assert client.get("/models").json()["loaded_models"] == ["demo"]
    assert client.delete("/cache", params={"model_id": "not-loaded"}).json() == {"unloaded": []}


def test_models_lists_the_user_mapping_and_loaded_models(client, small_request):
    client.post("/generate", json=small_request(user_id="bob"))

    body = client.get("/models").json()

    assert body["default_model"] == "demo"
    assert body["user_models"] == {
        "default": {"kind": "checkpoint", "source": "demo"},
        "alice": {"kind": "checkpoint", "source": "demo"},
        "bob": {"kind": "checkpoint", "source": "demo2"},
    }
    assert body["loaded_models"] == ["demo2"]
    assert body["cache"]["device"]["models"] == ["demo2"] and body["cache"]["device"]["misses"] == 1


def test_user_without_a_model_gets_404_and_no_other_users_model(client, small_request, load_calls):
    response = client.post("/generate", json=small_request(user_id="mallory"))

    assert response.status_code == 404
    assert "mallory" in response.json()["detail"] and "PUT /users/mallory/model" in response.json()["detail"]
    assert load_calls == []


def test_model_folder_that_fails_to_load_gives_503_and_others_keep_working(settings, small_request):
    broken = settings.models_dir / "broken-checkpoint"
    broken.mkdir(exist_ok=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    settings.user_models["carol"] = "broken-checkpoint"
    with TestClient(create_app(settings)) as client:
        response = client.post("/generate", json=small_request(user_id="carol"))

        assert response.status_code == 503
        assert "broken-checkpoint" in response.json()["detail"]
        assert client.post("/generate", json=small_request()).status_code == 200
        assert client.get("/health").json()["loaded_models"] == ["demo"]


def test_hub_model_that_cannot_be_downloaded_gives_503_naming_the_setting(settings, small_request):
    settings.user_models["dave"] = "nobody/no-such-dreambooth"
    with TestClient(create_app(settings)) as client:
        response = client.post("/generate", json=small_request(user_id="dave"))

    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "could not download model 'nobody/no-such-dreambooth'" in detail
    assert "SD_DEFAULT_MODEL" in detail and "SD_USER_MODELS" in detail


def test_failed_load_is_not_cached_and_the_next_request_tries_again(settings, small_request):
    settings.user_models["erin"] = "erin-dreambooth"
    with TestClient(create_app(settings)) as client:
        assert client.post("/generate", json=small_request(user_id="erin")).status_code == 503

        save_random_pipeline(settings.models_dir / "erin-dreambooth", seed=2)  # the model arrives
        response = client.post("/generate", json=small_request(user_id="erin"))

    assert response.status_code == 200 and response.json()["model_id"] == "erin-dreambooth"


def test_unloading_a_model_waits_for_the_batch_running_on_it(client, small_request, hold_generation):
    answers: dict = {}
    generation = threading.Thread(target=lambda: answers.update(generate=client.post("/generate", json=small_request())))
    generation.start()
    assert hold_generation.entered.wait(DEADLINE_S), "the generation never reached the pipeline"
    unloading = threading.Thread(target=lambda: answers.update(unload=client.delete("/cache")))
    unloading.start()

    unloading.join(timeout=1)
    waited = unloading.is_alive()
    hold_generation.set()
    generation.join(DEADLINE_S)
    unloading.join(DEADLINE_S)

    assert waited, "the unload did not wait for the running batch"
    assert answers["generate"].status_code == 200 and answers["unload"].json() == {"unloaded": ["demo"]}
    assert client.get("/health").json()["loaded_models"] == []
