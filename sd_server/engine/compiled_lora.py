"""SD_COMPILE's LoRA slots: each LoRA layer of a compiled UNet keeps a bank of adapters padded to one rank
(SD_COMPILE_LORA_RANK), and every call picks each sample's adapter and scale by index. A batch's adapters change the
bank's contents, never the compiled graph: LoRA batches, one adapter or many, run compiled without a recompile. An
attention's fused projection adds the updates of the layers it stands in for."""

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import LoraLayer

from sd_server.engine.mixed_adapters import SampleAdapter, is_plain, repeats_per_image

logger = logging.getLogger(__name__)

SLOT_DOWN, SLOT_UP = "lora_slot_down", "lora_slot_up"  # buffers of each LoRA layer: (slots, in, rank), (slots, rank, out)
SLOT_INDEX, SLOT_SCALE = "lora_slot_index", "lora_slot_scale"  # buffers of the UNet: each sample's slot and scale


def is_pointwise(module: torch.nn.Module) -> bool:
    """A linear layer, or a 1x1 convolution (SD1.5's ``proj_in`` and ``proj_out``): a matmul on each position."""
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1


def channels(module: torch.nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a pointwise layer."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


class SlotUpdate:
    """Forward hook of a LoRA layer: while the slots are active, the base output plus each sample's low-rank update
    from its slot (slot 0 is zeros, for the base model's samples)."""

    def __init__(self, slots: "LoraSlots") -> None:
        self.slots = slots

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The layer's output, with each sample's update added when the slots are active."""
        if not self.slots.active:
            return output
        return output + self.slots.update(module, args[0]).reshape(output.shape).to(output.dtype)


class FusedSlotUpdate:
    """Forward hook of a fused projection (an attention's ``to_qkv``, or ``to_kv``): while the slots are active, the
    updates of the LoRA layers it stands in for (``parts``: ``to_q``, ``to_k``, ``to_v``), side by side as their
    outputs are."""

    def __init__(self, slots: "LoraSlots", parts: list[LoraLayer]) -> None:
        self.slots, self.parts = slots, parts

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The fused output, with each sample's updates of every part added when the slots are active."""
        if not self.slots.active:
            return output
        updates = [self.slots.update(part, args[0]).reshape(*output.shape[:-1], -1) for part in self.parts]
        return output + torch.cat(updates, dim=-1).to(output.dtype)


def fused_projections(unet: UNet2DConditionModel) -> list[tuple[torch.nn.Linear, list[LoraLayer]]]:
    """Each fused projection of the UNet's attentions (``fuse_qkv_projections``) with the LoRA layers it stands in
    for: ``to_qkv`` for ``to_q``, ``to_k`` and ``to_v`` in self-attention, ``to_kv`` for ``to_k`` and ``to_v`` in
    cross-attention. (Every part is one: ``wrap_lora_layers`` wraps them all before the projections are fused.)"""
    fused = []
    for attention in unet.modules():
        if isinstance(attention, Attention) and attention.fused_projections:
            names = ["to_k", "to_v"] if attention.is_cross_attention else ["to_q", "to_k", "to_v"]
            projection = attention.to_kv if attention.is_cross_attention else attention.to_qkv
            fused.append((projection, [getattr(attention, name) for name in names]))
    return fused


class LoraSlots:
    """A compiled UNet's bank of LoRA adapters: ``adapters`` slots of ``rank`` in every pointwise LoRA layer, kept
    across batches (least recently used replaced first), and each call's samples' slots and scales (for ``adapters``
    images, two samples each: classifier-free guidance)."""

    def __init__(self, unet: UNet2DConditionModel, adapters: int, rank: int) -> None:
        samples = 2 * adapters
        self.unet, self.rank, self.capacity = unet, rank, adapters
        self.active = False  # read inside the compiled graph: the base's graphs and the LoRA graphs are two variants
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # adapter name -> its slot, least recently used first
        self.fits: dict[str, bool] = {}  # adapter name -> whether its layers and rank fit the slots
        self.calls: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (samples, padded) -> slots, scales
        self.images: list[SampleAdapter] = []
        weight = unet.conv_in.weight
        unet.register_buffer(SLOT_INDEX, torch.zeros(samples, dtype=torch.long, device=weight.device), persistent=False)
        unet.register_buffer(SLOT_SCALE, torch.zeros(samples, dtype=weight.dtype, device=weight.device), persistent=False)
        self.layers = [layer for layer in unet.modules() if isinstance(layer, LoraLayer) and is_pointwise(layer.get_base_layer())]
        for layer in self.layers:
            inputs, outputs = channels(layer.get_base_layer())
            layer.register_buffer(SLOT_DOWN, weight.new_zeros(adapters + 1, inputs, rank), persistent=False)
            layer.register_buffer(SLOT_UP, weight.new_zeros(adapters + 1, rank, outputs), persistent=False)
            layer.register_forward_hook(SlotUpdate(self))
        for fused, parts in fused_projections(unet):
            fused.register_forward_hook(FusedSlotUpdate(self, parts))

    def update(self, layer: LoraLayer, inputs: torch.Tensor) -> torch.Tensor:
        """Each sample's low-rank update of ``layer`` for its ``inputs`` (two batched matmuls), in the slots' dtype:
        (samples, positions, outputs) for a linear layer, (samples, outputs, positions) for a 1x1 convolution."""
        samples = inputs.shape[0]
        index = getattr(self.unet, SLOT_INDEX)[:samples]
        scale = getattr(self.unet, SLOT_SCALE)[:samples].view(-1, 1, 1)
        down, up = getattr(layer, SLOT_DOWN)[index], getattr(layer, SLOT_UP)[index] * scale
        if inputs.dim() == 4:  # a 1x1 convolution: channels first
            positions = inputs.flatten(2).transpose(1, 2).to(down.dtype)
            return torch.bmm(torch.bmm(positions, down), up).transpose(1, 2)
        return torch.bmm(torch.bmm(inputs.reshape(samples, -1, down.shape[1]).to(down.dtype), down), up)

    def nbytes(self) -> int:
        """Bytes of the slots' buffers on the UNet's device: each layer's adapters, and each sample's slot and scale."""
        samples = getattr(self.unet, SLOT_INDEX).nbytes + getattr(self.unet, SLOT_SCALE).nbytes
        return samples + sum(getattr(layer, name).nbytes for layer in self.layers for name in (SLOT_DOWN, SLOT_UP))

    def hold(self, names: set[str]) -> bool:
        """True when every adapter of ``names`` fits the slots (its UNet layers all have slots, its rank at most the
        slots' rank, a plain LoRA) and there are slots enough for all of them."""
        return len(names) <= self.capacity and all(self._fits(name) for name in names)

    @contextmanager
    def applied(self, images: list[SampleAdapter]) -> Iterator[None]:
        """Within the block, the UNet's image i runs with ``images[i]``'s adapter and scale from the slots (loaded
        first where they are not yet). Call after ``hold`` said yes, with the checkpoint's lock held."""
        names = {image.name for image in images} - {None}
        for name in sorted(names):
            self._load(name, names)
        self.images, self.calls, self.active = images, {}, True
        try:
            yield
        finally:
            self.active, self.images, self.calls = False, [], {}

    def select(self, samples: int, padded: int) -> None:
        """Before a UNet call on ``samples`` samples padded to ``padded``: each sample's slot and scale (classifier-free
        guidance runs each image twice; the padding repeats the last sample)."""
        if (samples, padded) not in self.calls:
            repeats = repeats_per_image(samples, len(self.images))
            slots = [0 if image.name is None else self.slot_of[image.name] for image in self.images] * repeats
            scales = [0.0 if image.name is None else image.scale for image in self.images] * repeats
            slots, scales = slots + slots[-1:] * (padded - samples), scales + scales[-1:] * (padded - samples)
            self.calls[samples, padded] = (self._on_device(slots, torch.long), self._on_device(scales, self.unet.dtype))
        slots, scales = self.calls[samples, padded]
        getattr(self.unet, SLOT_INDEX)[:padded].copy_(slots)
        getattr(self.unet, SLOT_SCALE)[:padded].copy_(scales)

    @contextmanager
    def warming(self) -> Iterator[None]:
        """Within the block, the LoRA variant of the graphs runs, every sample on the zero slot."""
        getattr(self.unet, SLOT_INDEX).zero_()
        getattr(self.unet, SLOT_SCALE).zero_()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _on_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a tensor on the UNet's device, copied without waiting for it (from pinned memory on CUDA)."""
        device = getattr(self.unet, SLOT_INDEX).device
        host = torch.tensor(values, dtype=dtype)
        return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)

    def _fits(self, name: str) -> bool:
        """Whether adapter ``name`` can run from the slots; said once per adapter (a name is one file's content)."""
        if name not in self.fits:
            slotted = set(self.layers)
            layers = [layer for layer in self.unet.modules() if isinstance(layer, LoraLayer) and name in layer.lora_A]
            self.fits[name] = all(layer in slotted and self._fits_layer(layer, name) for layer in layers)
            if not self.fits[name]:
                logger.info("LoRA %s runs the UNet uncompiled: a layer without slots, a rank past %d, or a variant", name, self.rank)
        return self.fits[name]

    def _fits_layer(self, layer: LoraLayer, name: str) -> bool:
        """A plain LoRA of ``layer`` (no bias, no DoRA) of rank at most the slots'."""
        return is_pointwise(layer.lora_A[name]) and is_plain(layer, name) and layer.r[name] <= self.rank

    def _load(self, name: str, batch: set[str]) -> None:
        """Put adapter ``name`` in a slot unless it is in one: a free slot, else the least recently used one that no
        adapter of ``batch`` holds."""
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            return
        if free := set(range(1, self.capacity + 1)) - set(self.slot_of.values()):
            slot = min(free)
        else:
            oldest = next(old for old in self.slot_of if old not in batch)
            slot = self.slot_of.pop(oldest)  # before the copies: a slot half overwritten belongs to no adapter
        with torch.no_grad():  # the adapters' weights may require grad; the slots are plain copies
            for layer in self.layers:
                self._fill(layer, slot, name)
        self.slot_of[name] = slot

    @staticmethod
    def _fill(layer: LoraLayer, slot: int, name: str) -> None:
        """Layer ``layer``'s slot ``slot``: adapter ``name``'s A and scaling x B, zero-padded to the slots' rank
        (zeros where the adapter leaves the layer alone)."""
        down, up = getattr(layer, SLOT_DOWN)[slot], getattr(layer, SLOT_UP)[slot]
        down.zero_()
        up.zero_()
        if name in layer.lora_A:
            layer.set_scale(name, 1.0)  # the adapter's own scaling (alpha / rank); each sample's scale comes per call
            rank = layer.r[name]
            down[:, :rank] = layer.lora_A[name].weight.reshape(rank, -1).t()
            up[:rank] = (layer.lora_B[name].weight.reshape(-1, rank) * layer.scaling[name]).t()
