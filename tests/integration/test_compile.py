"""SD_COMPILE and the memory format: the compiled UNet (and VAE decode) draws what the eager one draws, is compiled for
every batch size before its model is ready, never compiles again for a batch that fits a compiled size, runs LoRA batches (one
adapter or several, any scale) from its LoRA slots without recompiling, leaves adapters the slots cannot hold to the
eager UNet, and takes its kernels from the disk cache on the next start."""

import gc
import json
import pickle
import subprocess
import sys
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from config import Settings
from helpers import PROJECT_DIR
from model_service import ModelService
from sd_server.demo.random_pipeline import save_random_lora
from sd_server.domain.generation import SchedulerName
from sd_server.domain.models import CheckpointModel, LoraModel
from sd_server.engine.compiled import (
    LORA_TARGETS,
    CompiledVaeDecode,
    PipelineCompiler,
    default_batch_sizes,
    memory_format_named,
    pad_batch,
    padded_size,
    parse_size,
)
from sd_server.engine.compiled_lora import fused_projections
from sd_server.engine.hires import decode_latents
from sd_server.engine.interface import BatchItem, BatchKey

DEMO = CheckpointModel(source="demo")
COMPILED_TOLERANCE = 3  # the compiled kernels sum in another order: a level or two of 255 after a few steps


@pytest.fixture(scope="module", autouse=True)
def compiled_graphs_are_let_go() -> Iterator[None]:
    """After the module, TorchDynamo forgets its graphs (and the traced stand-ins of parameters they keep)."""
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel cache for the module's engines, as one server's restarts share SD_MODELS_DIR/.compile-cache."""
    return tmp_path_factory.mktemp("compile-cache")


def engine(models_dir: Path, data_dir: Path, **settings) -> ModelService:
    """An engine on the test models, at most two images a batch."""
    return ModelService(Settings(_env_file=None, default_model="demo", models_dir=models_dir, data_dir=data_dir, max_batch_size=2, **settings))


@pytest.fixture(scope="module")
def lora_models_dir(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo, and LoRAs of the strength trained ones have: `loras/carol` (rank 4), `loras/dave` (rank 8, the text
    encoder too), `loras/erin` (rank 4, every layer kohya files reach: the 1x1 convolutions proj_in and proj_out, the
    feed-forward layers) and `loras/wide` (rank 32, past the slots' default 16). The suite's alice and bob are so strong that
    the UNet turns rounding differences into visible ones, and compiled kernels round differently."""
    folder = tmp_path_factory.mktemp("compile-models")
    (folder / "demo").symlink_to(models_dir / "demo")
    shapes = {"carol": {}, "dave": {"rank": 8, "text_encoder": True}, "erin": {"targets": tuple(LORA_TARGETS)}, "wide": {"rank": 32}}
    for seed, (name, shape) in enumerate(shapes.items()):
        save_random_lora(folder / "loras" / f"{name}.safetensors", seed=seed, spread=0.2, **shape)
    return folder


def lora(name: str, scale: float = 1.0) -> LoraModel:
    """The LoRA ``name`` of ``lora_models_dir`` on demo."""
    return LoraModel(base="demo", source=f"loras/{name}.safetensors", scale=scale)


@pytest.fixture(scope="module")
def compiled(lora_models_dir: Path, compile_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelService:
    """An engine with SD_COMPILE on, demo prepared and compiled once for the module (on a CPU device the UNet compiles
    on the device thread, before the model's first batch)."""
    service = engine(lora_models_dir, tmp_path_factory.mktemp("data"), compile=True, compile_cache_dir=compile_cache)
    assert service.prepare(DEMO)
    draw(service, key_at_native_size(service), [DEMO], [0])
    return service


@pytest.fixture(scope="module")
def eager(lora_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelService:
    """The same engine without SD_COMPILE."""
    return engine(lora_models_dir, tmp_path_factory.mktemp("data"))


def key_at_native_size(service: ModelService) -> BatchKey:
    """Two steps with CFG at demo's native size, the size SD_COMPILE warms without SD_COMPILE_SIZES (demo prepared)."""
    pipeline = service.cache.get("demo").pipeline
    side = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return BatchKey("demo", side, side, 2, 7.5, None)


@pytest.fixture(scope="module")
def native_key(compiled: ModelService) -> BatchKey:
    """Two steps with CFG at demo's native size."""
    return key_at_native_size(compiled)


def draw(service: ModelService, key: BatchKey, models: list, seeds: list[int]) -> list[np.ndarray]:
    """The pixels of one pipeline call with one image per (model, seed)."""
    items = [BatchItem(model, f"a photo {seed}", None, seed, 1) for model, seed in zip(models, seeds)]
    output = service.run_batch(key, items, lambda step, total, previews=None: None, lambda: False)
    return [np.asarray(images[0].convert("RGB"), dtype=np.int16) for images in output.images]


def assert_draws_alike(compiled: ModelService, eager: ModelService, key: BatchKey, models: list, seeds: list[int]) -> None:
    """The compiled engine's images of one batch equal the eager engine's, but for rounding."""
    for index, (fast, slow) in enumerate(zip(draw(compiled, key, models, seeds), draw(eager, key, models, seeds), strict=True)):
        assert np.abs(fast - slow).max() <= COMPILED_TOLERANCE, f"image {index} of {[getattr(m, 'source', m) for m in models]}"


def test_batches_are_padded_to_powers_of_two_up_to_the_largest_batch():
    assert default_batch_sizes(8) == [1, 2, 4, 8]
    assert default_batch_sizes(6) == [1, 2, 4, 6]
    assert default_batch_sizes(1) == [1]
    assert [padded_size(samples, [2, 4, 8]) for samples in (1, 2, 3, 8, 9)] == [2, 2, 4, 8, None]
    assert parse_size("768x512") == (768, 512)


def test_torchdynamo_may_keep_a_graph_for_every_batch_size_at_every_image_size(models_dir, tmp_path):
    settings = Settings(_env_file=None, models_dir=models_dir, compile=True, compile_sizes=["512x512", "768x512", "512x768"], compile_cache_dir=tmp_path)
    compiler = PipelineCompiler(settings, max_batch_size=8)
    assert compiler.batch_sizes == [1, 2, 4, 8]
    assert torch._dynamo.config.recompile_limit >= 4 * 4, "16 graphs of one forward function, past the default of 8"


MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format]
PICKLE_AFTER_ANOTHER_MODULE_IMPORTED_TORCH = """
import pickle, sys, types
first = sys.modules["imported_torch_first"] = types.ModuleType("imported_torch_first")
import torch
first.torch = torch
from config import Settings
from sd_server.engine.compiled import PipelineCompiler, memory_format_named
PipelineCompiler(Settings(_env_file=None, compile=True, compile_cache_dir=sys.argv[1]), max_batch_size=1)
print(" ".join(pickle.dumps(memory_format_named(name)).hex() for name in sys.argv[2:]))
"""


def test_memory_formats_pickle_alike_whatever_module_imported_torch_first(models_dir, tmp_path):
    # Inductor's disk-cache keys pickle them: pickle would name the first module in sys.modules that holds `torch`.
    PipelineCompiler(Settings(_env_file=None, models_dir=models_dir, compile=True, compile_cache_dir=tmp_path), max_batch_size=1)
    process = subprocess.run(
        [sys.executable, "-c", PICKLE_AFTER_ANOTHER_MODULE_IMPORTED_TORCH, str(tmp_path), *map(str, MEMORY_FORMATS)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    elsewhere = [bytes.fromhex(data) for data in process.stdout.split()]
    assert elsewhere == [pickle.dumps(memory_format) for memory_format in MEMORY_FORMATS]
    assert [pickle.loads(data) for data in elsewhere] == MEMORY_FORMATS
    with pytest.raises(ValueError, match="not a memory format"):
        memory_format_named("torch.float16")


def test_padding_repeats_the_last_sample_and_leaves_other_values_alone():
    batch = torch.arange(6.0).reshape(3, 2)
    padded = pad_batch(batch, 3, 4)
    assert padded.shape == (4, 2) and padded.is_contiguous()
    assert torch.equal(padded[:3], batch) and torch.equal(padded[3], batch[2])
    assert pad_batch(torch.tensor(5.0), 3, 4).shape == ()  # a scalar has no batch
    assert pad_batch(None, 3, 4) is None


def test_the_unet_and_vae_decode_are_compiled_for_every_batch_size_before_its_model_is_ready(compiled, native_key):
    report = compiled.report()["compile"]
    assert report["enabled"] and report["batch_sizes"] == [1, 2] and report["vae"]
    assert report["compiles"] == 6, f"a base and a LoRA UNet graph and a VAE decode graph per batch size: {report}"
    assert report["compile_seconds"] > 0 and report["compiles_on_requests"] == 0
    assert compiled.is_ready(DEMO)
    pipeline = compiled.cache.get("demo").pipeline
    assert isinstance(pipeline.vae.decode, CompiledVaeDecode)
    factor = pipeline.vae_scale_factor
    assert pipeline.vae.decode.warm_sizes == {(native_key.height // factor, native_key.width // factor)}


def test_the_compiled_vae_decodes_what_the_eager_one_does_and_past_the_largest_batch_runs_eager(compiled):
    decode = compiled.cache.get("demo").pipeline.vae.decode
    (height, width), before = next(iter(decode.warm_sizes)), compiled.report()["compile"]["compiles"]
    latents = torch.randn(3, decode.vae.config.latent_channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for images in (1, 2, 3):  # 3: past the largest compiled batch
            pictures = decode(latents[:images]).sample
            assert pictures.shape[0] == images
            assert torch.allclose(pictures, decode.eager(latents[:images]).sample, atol=1e-4), f"{images} image(s)"
    assert compiled.report()["compile"]["compiles"] == before


def test_hires_fix_decoding_its_first_pass_at_a_compiled_size_compiles_nothing(compiled):
    pipeline = compiled.cache.get("demo").pipeline
    height, width = next(iter(pipeline.vae.decode.warm_sizes))
    before = compiled.report()["compile"]["compiles"]
    pictures = decode_latents(pipeline, torch.randn(1, pipeline.vae.config.latent_channels, height, width))
    factor = pipeline.vae_scale_factor
    assert [picture.size for picture in pictures] == [(width * factor, height * factor)]
    assert compiled.report()["compile"]["compiles"] == before, "decoded in the grad mode the graphs were compiled in"


def test_with_sd_compile_vae_off_the_decode_stays_eager(lora_models_dir, compile_cache, eager, native_key, tmp_path):
    service = engine(lora_models_dir, tmp_path, compile=True, compile_cache_dir=compile_cache, compile_vae=False)
    assert service.prepare(DEMO)
    assert_draws_alike(service, eager, native_key, [DEMO], [61])
    assert service.report()["compile"]["vae"] is False
    vae = service.cache.get("demo").pipeline.vae
    assert not isinstance(vae.decode, CompiledVaeDecode) and service.is_ready(DEMO)


def test_the_device_tier_counts_the_slots_and_fused_projections_from_the_load_before_any_compile(
    lora_models_dir, compile_cache, eager, tmp_path
):
    service = engine(lora_models_dir, tmp_path, compile=True, compile_cache_dir=compile_cache)
    assert service.prepare(DEMO) and eager.prepare(DEMO)
    assert service.report()["compile"]["compiles"] == 0, "on a CPU device the UNet compiles on its model's first batch"
    unet = service.cache.get("demo").pipeline.unet
    slots, fused = unet.forward.slots, [projection for projection, _ in fused_projections(unet)]
    assert slots.nbytes() > 0 and len(fused) == len(unet.attn_processors) > 0, "every attention's projections fused"
    fused_bytes = sum(weight.nbytes for projection in fused for weight in projection.parameters())

    def model_bytes(service: ModelService) -> int:
        cache = service.report()["cache"]
        return cache["device"]["bytes"] - cache["adapters"]["bytes"]

    assert model_bytes(service) - model_bytes(eager) == slots.nbytes() + fused_bytes


def test_compiled_images_equal_the_uncompiled_ones(compiled, eager, native_key):
    for seeds in ([11], [12, 13]):
        assert_draws_alike(compiled, eager, native_key, [DEMO] * len(seeds), seeds)


def test_a_batch_that_fits_a_compiled_size_compiles_nothing(compiled, native_key):
    before = compiled.report()["compile"]["compiles"]
    draw(compiled, native_key, [DEMO], [1])
    draw(compiled, native_key, [DEMO, DEMO], [2, 3])
    draw(compiled, BatchKey("demo", native_key.width, native_key.height, 2, 1.0, None), [DEMO], [4])  # no CFG: 1 sample
    draw(compiled, BatchKey("demo", native_key.width, native_key.height, 3, 7.5, SchedulerName.euler), [DEMO], [5])  # float timesteps
    long_prompt = replace(native_key, prompt_chunks=3)  # three chunks of tokens: one graph takes any prompt length
    draw(compiled, long_prompt, [DEMO], [6])
    report = compiled.report()["compile"]
    assert report["compiles"] == before and report["compiles_on_requests"] == 0, report


def test_lora_batches_run_compiled_from_the_slots_and_no_adapter_change_recompiles(compiled, eager, native_key):
    before = compiled.report()["compile"]
    batches = ([lora("carol"), DEMO], [lora("carol")], [lora("dave"), lora("carol", 0.5)], [lora("dave", 1.5), lora("dave")])
    for batch in batches:
        assert_draws_alike(compiled, eager, native_key, batch, list(range(7, 7 + len(batch))))
        assert_draws_alike(compiled, eager, native_key, [DEMO], [9])  # the base after: the slots switched off
    after = compiled.report()["compile"]
    assert after["compiles"] == before["compiles"] and after["lora_batches_uncompiled"] == before["lora_batches_uncompiled"], after


def test_a_lora_draws_what_it_draws_alone_whatever_shares_its_batch(compiled, native_key):
    alone = draw(compiled, native_key, [lora("carol")], [21])[0]
    for batch in ([lora("carol"), lora("dave")], [lora("carol"), DEMO], [lora("carol"), lora("carol", 0.0)]):
        assert np.abs(draw(compiled, native_key, batch, [21, 22])[0] - alone).max() <= COMPILED_TOLERANCE, batch
    base = draw(compiled, native_key, [DEMO], [21])[0]
    assert np.abs(alone - base).mean() > 2 * COMPILED_TOLERANCE, "the LoRA changes the picture"
    unscaled = draw(compiled, native_key, [lora("carol", 0.0)], [21])[0]
    assert np.abs(unscaled - base).max() <= COMPILED_TOLERANCE, "scale 0 draws the base model's picture"


def test_more_adapters_than_slots_take_the_least_recently_used_slots(compiled, eager, native_key):
    slots = compiled.cache.get("demo").pipeline.unet.forward.slots
    assert slots.capacity == 2  # one adapter per image of the largest batch
    before = compiled.report()["compile"]["compiles"]
    for batch in ([lora("carol"), lora("dave")], [lora("erin")], [lora("carol"), lora("erin")], [lora("dave"), lora("carol")]):
        assert_draws_alike(compiled, eager, native_key, batch, [31, 32][: len(batch)])
        assert {Path(model.source).stem for model in batch} <= slot_names(compiled)
    assert compiled.report()["compile"]["compiles"] == before


def slot_names(service: ModelService) -> set[str]:
    """The LoRAs (by file name) that demo's compiled UNet holds in its slots."""
    adapters = service.cache.get("demo").adapters
    slots = service.cache.get("demo").pipeline.unet.forward.slots
    return {Path(adapters[name].source).stem for name in slots.slot_of if name in adapters}


def test_a_lora_past_the_slots_rank_runs_uncompiled_and_unloading_recompiles_nothing(compiled, eager, native_key):
    before = compiled.report()["compile"]
    assert before["lora_rank"] == 16
    assert_draws_alike(compiled, eager, native_key, [lora("wide"), lora("carol")], [41, 42])
    assert_draws_alike(compiled, eager, native_key, [lora("wide")], [43])
    after = compiled.report()["compile"]
    assert after["lora_batches_uncompiled"] == before["lora_batches_uncompiled"] + 2, after
    for name in ("wide", "carol", "dave", "erin"):
        compiled.unload_adapter(lora(name))
    assert_draws_alike(compiled, eager, native_key, [DEMO], [44])  # the base once no adapter is left
    assert compiled.report()["compile"]["compiles"] == before["compiles"], compiled.report()["compile"]


def test_a_models_first_batch_with_a_lora_compiles_both_graphs_before_its_adapters_apply_and_unloading_frees_it(
    lora_models_dir, compile_cache, eager, tmp_path
):
    # Batches padded to 3 images: graphs of a shape no other engine here compiled (TorchDynamo reuses a graph for any
    # UNet of the same structure and shapes, so the module's other graphs would hide a recompile). The VAE decodes
    # padded to 3 images too.
    service = engine(lora_models_dir, tmp_path, compile=True, compile_cache_dir=compile_cache, compile_batch_sizes=[3])
    assert service.prepare(DEMO)
    key = key_at_native_size(service)
    assert_draws_alike(service, eager, key, [lora("carol")], [51])  # on a CPU device the UNet compiles on this batch
    assert_draws_alike(service, eager, key, [DEMO, lora("dave")], [52, 53])
    assert_draws_alike(service, eager, key, [DEMO], [54])
    report = service.report()["compile"]
    assert report["compiles"] == 3, f"a base and a LoRA graph, both before the first batch's adapters apply, and the VAE's: {report}"
    assert report["compiles_on_requests"] == 0 and report["lora_batches_uncompiled"] == 0, report
    pipeline = service.cache.get("demo").pipeline
    modules = [weakref.ref(pipeline.unet), weakref.ref(pipeline.vae)]
    del pipeline
    assert service.unload() == ["demo"]
    gc.collect()
    assert [module() for module in modules] == [None, None], "the compiled graphs keep no unloaded model in memory"


def test_an_image_size_not_warmed_compiles_on_its_first_request_and_says_so(compiled, native_key):
    before = compiled.report()["compile"]
    smaller = BatchKey("demo", native_key.width // 2, native_key.height // 2, 2, 7.5, None)
    draw(compiled, smaller, [DEMO], [1])
    draw(compiled, smaller, [DEMO], [2])
    after = compiled.report()["compile"]
    assert after["compiles_on_requests"] == before["compiles_on_requests"] + 2, f"the UNet's and the VAE decode's: {after}"
    assert after["compiles"] == before["compiles"] + 2


RESTART = """
import json, sys
from pathlib import Path
import torch
from config import Settings
from model_service import ModelService
from sd_server.domain.models import CheckpointModel
from sd_server.engine.interface import BatchItem, BatchKey

models_dir, data_dir, cache_dir = map(Path, sys.argv[1:4])
service = ModelService(Settings(_env_file=None, default_model="demo", models_dir=models_dir, data_dir=data_dir,
                                max_batch_size=2, compile=True, compile_cache_dir=cache_dir))
service.prepare(CheckpointModel(source="demo"))
pipeline = service.cache.get("demo").pipeline
side = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
key = BatchKey("demo", side, side, 1, 7.5, None)
service.run_batch(key, [BatchItem(CheckpointModel(source="demo"), "a photo", None, 0, 1)], lambda *a, **k: None, lambda: False)
counters = torch._dynamo.utils.counters
hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
print(json.dumps({"hits": hits, **service.report()["compile"]}))
"""


def start_compiled_server(models_dir: Path, data_dir: Path, cache_dir: Path) -> dict:
    """A fresh process's engine with SD_COMPILE, its first batch run; its compile report and cache hits."""
    process = subprocess.run(
        [sys.executable, "-c", RESTART, str(models_dir), str(data_dir), str(cache_dir)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_a_restarted_engine_takes_its_kernels_from_the_disk_cache(compiled, lora_models_dir, compile_cache, tmp_path):
    # The module's engine compiled its graphs cold into compile_cache; a new process on the same folder is its restart.
    assert any(compile_cache.rglob("*.so")) or any(compile_cache.rglob("*.py")), "no kernels were kept on disk"
    restarted = start_compiled_server(lora_models_dir, tmp_path / "data", compile_cache)
    assert restarted["compiles"] == 6, f"a base and a LoRA UNet graph and a VAE graph at each batch size: {restarted}"
    assert restarted["hits"] >= 6, f"each graph came from the disk cache: {restarted}"


def test_channels_last_weights_draw_the_same_images(models_dir, eager, native_key, tmp_path):
    channels_last = engine(models_dir, tmp_path, channels_last="on")
    channels_last.prepare(DEMO)
    unet = channels_last.cache.get("demo").pipeline.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_draws_alike(channels_last, eager, native_key, [DEMO], [9])
