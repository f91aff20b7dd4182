"""One router per resource."""

from sd_server.api.routes.a1111 import a1111_internal_router, a1111_router
from sd_server.api.routes.generation import generation_router
from sd_server.api.routes.images import images_router
from sd_server.api.routes.jobs import jobs_router
from sd_server.api.routes.keys import keys_router
from sd_server.api.routes.models import models_router
from sd_server.api.routes.offline_docs import offline_docs_router
from sd_server.api.routes.provenance import provenance_router
from sd_server.api.routes.service import service_router
from sd_server.api.routes.session import session_router
from sd_server.api.routes.styles import styles_router
from sd_server.api.routes.trainings import trainings_router
from sd_server.api.routes.users import users_router

ROUTERS = (
    generation_router, jobs_router, images_router, models_router, users_router, trainings_router, styles_router, keys_router,
    provenance_router, session_router, service_router, a1111_router, a1111_internal_router, offline_docs_router,
)  # fmt: skip
