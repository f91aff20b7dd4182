"""Mixed-adapter batches: every image of one pipeline call gets its own LoRA and scale, while the base weights run once
for the whole batch (a segmented LoRA matmul, in the spirit of Punica and S-LoRA, for diffusion)."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer


@dataclass(frozen=True)
class SampleAdapter:
    """The adapter one image runs with: its name in the pipeline (None: the base model alone) and its scale."""

    name: str | None
    scale: float = 1.0


def lora_layers(pipeline: StableDiffusionPipeline, outside: torch.nn.Module | None = None) -> Iterator[LoraLayer]:
    """Every LoRA layer of the pipeline's modules (UNet, and the text encoder if an adapter reached it) but those of
    ``outside``."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module) and component is not outside:
            yield from (module for module in component.modules() if isinstance(module, LoraLayer))


class SegmentedLinearLora:
    """One linear layer's adapters for a batch: for each sample, its adapter's A (r, in) and scale·scaling·B (out, r),
    zero-padded to the batch's largest rank (zeros for a sample whose adapter leaves this layer alone), so that a call
    adds every sample's update with two batched matmuls. Gathered once per call size, then reused at every step."""

    def __init__(self, layer: LoraLayer, names: list[str], rows: list[int], scales: list[float]) -> None:
        present = [name for name in names if name in layer.lora_A]
        rank = max(layer.lora_A[name].weight.shape[0] for name in present)
        weight = layer.lora_A[present[0]].weight
        out_features, in_features = layer.lora_B[present[0]].weight.shape[0], weight.shape[1]
        down = weight.new_zeros(len(names) + 1, rank, in_features)
        up = weight.new_zeros(len(names) + 1, out_features, rank)
        for row, name in enumerate(names, start=1):
            if name in present:
                layer.set_scale(name, 1.0)
                down[row, : layer.r[name]] = layer.lora_A[name].weight
                up[row, :, : layer.r[name]] = layer.lora_B[name].weight * layer.scaling[name]
        index = torch.tensor(rows, device=weight.device)
        factor = torch.tensor(scales, device=weight.device, dtype=weight.dtype).view(-1, 1, 1)
        self.down, self.up = down[index].transpose(1, 2).contiguous(), (up[index] * factor).transpose(1, 2).contiguous()
        self.by_call_size: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the base layer's output plus each sample's own low-rank update."""
        batch = output.shape[0]
        if batch not in self.by_call_size:
            repeats = repeats_per_image(batch, len(self.down))
            self.by_call_size[batch] = (self.down.repeat(repeats, 1, 1), self.up.repeat(repeats, 1, 1))
        down, up = self.by_call_size[batch]
        inputs = args[0].reshape(batch, -1, down.shape[1]).to(down.dtype)
        update = torch.bmm(torch.bmm(inputs, down), up)
        return output + update.reshape(output.shape).to(output.dtype)


class GroupedLora:
    """Any other LoRA layer (a convolution, say): each adapter runs on the samples that use it."""

    def __init__(self, layer: LoraLayer, names: list[str], rows: list[int], scales: list[float]) -> None:
        if variants := [name for name in names if name in getattr(layer, "lora_variant", {})]:
            # The device worker then runs the batch's jobs one by one, each on peft's own forward.
            raise RuntimeError(f"adapters {variants} are LoRA variants (DoRA) that cannot share a batch with others")
        for name in names:
            layer.set_scale(name, 1.0)
        self.layer, self.rows, self.scales = layer, rows, scales
        self.names = {row: name for row, name in enumerate(names, start=1) if name in layer.lora_A}
        self.by_call_size: dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the base layer's output plus, for each adapter, its update on its own samples."""
        batch = output.shape[0]
        if batch not in self.by_call_size:
            self.by_call_size[batch] = self.groups(batch, output)
        for name, samples, factor in self.by_call_size[batch]:
            sub_batch = args[0][samples].to(self.layer.lora_A[name].weight.dtype)
            update = self.layer.lora_B[name](self.layer.lora_A[name](sub_batch)) * self.layer.scaling[name]
            output[samples] += (update * factor.view(-1, *([1] * (update.dim() - 1)))).to(output.dtype)
        return output

    def groups(self, batch: int, output: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """For each adapter of this layer: its name, the samples of a ``batch``-sample call that use it, their scales."""
        repeats = repeats_per_image(batch, len(self.rows))
        rows, scales = self.rows * repeats, self.scales * repeats
        groups = []
        for row, name in self.names.items():
            samples = [index for index, sample_row in enumerate(rows) if sample_row == row]
            if samples:
                factor = torch.tensor([scales[index] for index in samples], device=output.device, dtype=output.dtype)
                groups.append((name, torch.tensor(samples, device=output.device), factor))
        return groups


def repeats_per_image(batch: int, images: int) -> int:
    """How often each image's sample appears in a call on ``batch`` samples: classifier-free guidance runs every
    image twice, as [unconditional..., conditional...], so the per-image lists repeat."""
    if batch % images:
        raise RuntimeError(f"a LoRA layer saw {batch} samples for {images} images; their adapters cannot be matched")
    return batch // images


def is_plain(layer: LoraLayer, name: str) -> bool:
    """True when adapter ``name`` of this layer is a plain LoRA: no bias, no variant (DoRA)."""
    return layer.lora_B[name].bias is None and name not in getattr(layer, "lora_variant", {})


def is_segmentable(layer: LoraLayer, names: list[str]) -> bool:
    """True when every adapter of ``names`` in this layer is a plain linear LoRA (no bias, no DoRA)."""
    present = [name for name in names if name in layer.lora_A]
    return isinstance(layer.get_base_layer(), torch.nn.Linear) and all(
        isinstance(layer.lora_A[name], torch.nn.Linear) and is_plain(layer, name) for name in present
    )


@contextmanager
def per_sample_adapters(
    pipeline: StableDiffusionPipeline, samples: list[SampleAdapter], outside: torch.nn.Module | None = None
) -> Iterator[None]:
    """Within the block, image i of a pipeline call runs with ``samples[i]``'s adapter and scale: the LoRA layers
    compute their base weights only, and a hook adds each sample's update (none in ``outside``'s layers, whose adapters
    something else applies). Call with the checkpoint's lock held."""
    names = sorted({sample.name for sample in samples if sample.name is not None})
    rows = [0 if sample.name is None else names.index(sample.name) + 1 for sample in samples]
    scales = [0.0 if sample.name is None else sample.scale for sample in samples]
    pipeline.disable_lora()
    handles = []
    try:
        for layer in lora_layers(pipeline, outside):
            if any(name in layer.lora_A for name in names):
                kind = SegmentedLinearLora if is_segmentable(layer, names) else GroupedLora
                handles.append(layer.register_forward_hook(kind(layer, names, rows, scales), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def adapters_applied(
    pipeline: StableDiffusionPipeline, samples: list[SampleAdapter], slotted: torch.nn.Module | None = None
) -> Iterator[None]:
    """Within the block, image i of a pipeline call runs with ``samples[i]``'s adapter: LoRA layers off when no image
    has one (also once their adapters are gone, and on a UNet another checkpoint shares: a layer left on would apply
    whichever adapter ran last, and a compiled UNet would recompile), ``set_adapters`` when every image shares one,
    else each image its own (``per_sample_adapters``). The LoRA layers of ``slotted`` (a compiled UNet whose LoRA slots
    apply its adapters) stay off. Call with the checkpoint's lock held."""
    if all(sample.name is None for sample in samples):
        if next(lora_layers(pipeline), None) is not None:
            pipeline.disable_lora()
        yield
    elif slotted is not None:
        with per_sample_adapters(pipeline, samples, outside=slotted):
            yield
    elif len(set(samples)) == 1:
        pipeline.enable_lora()
        pipeline.set_adapters([samples[0].name], [samples[0].scale])
        yield
    else:
        with per_sample_adapters(pipeline, samples):
            yield
