"""The API's samplers as diffusers scheduler classes, and a fresh scheduler for each call."""

from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_server.domain.generation import SchedulerName


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class, and the options that make it this sampler."""

    scheduler_class: type[SchedulerMixin]
    options: dict


SCHEDULERS: dict[SchedulerName, SchedulerSpec] = {
    SchedulerName.pndm: SchedulerSpec(PNDMScheduler, {}),
    SchedulerName.ddim: SchedulerSpec(DDIMScheduler, {}),
    SchedulerName.euler: SchedulerSpec(EulerDiscreteScheduler, {}),
    SchedulerName.euler_a: SchedulerSpec(EulerAncestralDiscreteScheduler, {}),
    SchedulerName.heun: SchedulerSpec(HeunDiscreteScheduler, {}),
    SchedulerName.dpmpp_2m: SchedulerSpec(DPMSolverMultistepScheduler, {}),
    SchedulerName.dpmpp_2m_karras: SchedulerSpec(DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    SchedulerName.unipc: SchedulerSpec(UniPCMultistepScheduler, {}),
}


def scheduler_name(scheduler_class: type[SchedulerMixin]) -> str:
    """The API's name for a model's own scheduler class (``pndm`` for PNDMScheduler), else the class name."""
    for name, spec in SCHEDULERS.items():
        if spec.scheduler_class is scheduler_class and not spec.options:
            return name.value
    return scheduler_class.__name__


def fresh_scheduler(
    own_class: type[SchedulerMixin], config: dict, name: SchedulerName | None
) -> tuple[SchedulerMixin, str]:
    """A new scheduler for one call (no state carried over): the named one, or the model's own; and its API name."""
    if name is None:
        return own_class.from_config(config), scheduler_name(own_class)
    spec = SCHEDULERS[name]
    return spec.scheduler_class.from_config(config, **spec.options), name.value
