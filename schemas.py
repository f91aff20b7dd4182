"""The HTTP models of the API, one module per feature under ``sd_server/api/schemas``; this face keeps the design
card's ``schemas.py`` at the top, so ``from schemas import JobResponse`` works as it always has."""

from sd_server.api.schemas.a1111 import (
    A1111ImagesResponse,
    A1111Img2ImgRequest,
    A1111Model,
    A1111Progress,
    A1111ProgressState,
    A1111Sampler,
    A1111Style,
    A1111Txt2ImgRequest,
)
from sd_server.api.schemas.generation import (
    GENERATE_EXAMPLE,
    TEXT_TO_IMAGE_FIELDS,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    GenerationParameters,
)
from sd_server.api.schemas.jobs import (
    JobCreated,
    JobImage,
    JobLinks,
    JobList,
    JobProgress,
    JobRequest,
    JobResponse,
    JobResult,
)
from sd_server.api.schemas.keys import (
    KeyCreated,
    KeyCreateRequest,
    KeyInfo,
)
from sd_server.api.schemas.models import (
    USER_MODEL_EXAMPLES,
    UserModelResponse,
)
from sd_server.api.schemas.service import (
    AdapterStats,
    CacheClearResponse,
    CacheStats,
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    PartStatus,
    QueueStats,
    RayPlacement,
    ReplicaPlacement,
    RootResponse,
    TierStats,
)
from sd_server.api.schemas.session import (
    SessionRequest,
    SessionResponse,
)
from sd_server.api.schemas.styles import (
    StyleRequest,
    StyleResponse,
)
from sd_server.api.schemas.trainings import (
    TrainingCreated,
    TrainingForm,
    TrainingLinks,
    TrainingList,
    TrainingParameters,
    TrainingProgress,
    TrainingResponse,
)

__all__ = [
    "A1111ImagesResponse",
    "A1111Img2ImgRequest",
    "A1111Model",
    "A1111Progress",
    "A1111ProgressState",
    "A1111Sampler",
    "A1111Style",
    "A1111Txt2ImgRequest",
    "GENERATE_EXAMPLE",
    "TEXT_TO_IMAGE_FIELDS",
    "GeneratedImage",
    "GenerateRequest",
    "GenerateResponse",
    "GenerationParameters",
    "JobCreated",
    "JobImage",
    "JobLinks",
    "JobList",
    "JobProgress",
    "JobRequest",
    "JobResponse",
    "JobResult",
    "KeyCreated",
    "KeyCreateRequest",
    "KeyInfo",
    "USER_MODEL_EXAMPLES",
    "UserModelResponse",
    "AdapterStats",
    "CacheClearResponse",
    "CacheStats",
    "ErrorResponse",
    "HealthResponse",
    "ModelsResponse",
    "PartStatus",
    "QueueStats",
    "RayPlacement",
    "ReplicaPlacement",
    "RootResponse",
    "TierStats",
    "SessionRequest",
    "SessionResponse",
    "StyleRequest",
    "StyleResponse",
    "TrainingCreated",
    "TrainingForm",
    "TrainingLinks",
    "TrainingList",
    "TrainingParameters",
    "TrainingProgress",
    "TrainingResponse",
]
