"""The API's samplers as diffusers scheduler classes, and a fresh scheduler for each call."""

from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_server.domain.generation import SchedulerName, plain_sampler


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class, and the options that make it this sampler."""

    scheduler_class: type[SchedulerMixin]
    options: dict


SDE = {"algorithm_type": "sde-dpmsolver++"}
# As diffusers' own table of A1111 samplers maps them (docs: api/schedulers/overview).
BASE_SCHEDULERS: dict[SchedulerName, SchedulerSpec] = {
    SchedulerName.pndm: SchedulerSpec(PNDMScheduler, {}),
    SchedulerName.ddim: SchedulerSpec(DDIMScheduler, {}),
    SchedulerName.ddpm: SchedulerSpec(DDPMScheduler, {}),
    SchedulerName.euler: SchedulerSpec(EulerDiscreteScheduler, {}),
    SchedulerName.euler_a: SchedulerSpec(EulerAncestralDiscreteScheduler, {}),
    SchedulerName.heun: SchedulerSpec(HeunDiscreteScheduler, {}),
    SchedulerName.dpmpp_2m: SchedulerSpec(DPMSolverMultistepScheduler, {}),
    SchedulerName.dpmpp_2m_sde: SchedulerSpec(DPMSolverMultistepScheduler, SDE),
    SchedulerName.dpmpp_sde: SchedulerSpec(DPMSolverSinglestepScheduler, {}),
    SchedulerName.dpm2: SchedulerSpec(KDPM2DiscreteScheduler, {}),
    SchedulerName.dpm2_a: SchedulerSpec(KDPM2AncestralDiscreteScheduler, {}),
    SchedulerName.unipc: SchedulerSpec(UniPCMultistepScheduler, {}),
}


def spec_of(name: SchedulerName) -> SchedulerSpec:
    """The class and options of a sampler; a Karras variant is its plain sampler with Karras sigmas."""
    if name in BASE_SCHEDULERS:
        return BASE_SCHEDULERS[name]
    plain = BASE_SCHEDULERS[plain_sampler(name)]
    return SchedulerSpec(plain.scheduler_class, plain.options | {"use_karras_sigmas": True})


SCHEDULERS = {name: spec_of(name) for name in SchedulerName}


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
