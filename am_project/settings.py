"""AgentManager settings, read from the environment.

Every variable is documented in README.md ("Configuration"). A malformed value
stops start-up with an `ImproperlyConfigured` naming the variable. With
`DATABASE_URL` / `REDIS_URL` unset, the embedded PostgreSQL and Redis under
`var/` are started or attached to (see `am_project/embedded.py`).
"""

import secrets
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from am_project import embedded
from am_project.env import env_bool, env_float, env_int, env_list, env_str, env_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = embedded.var_dir()

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    """SECRET_KEY from the environment; else one generated once and kept in var/."""
    key = env_str("SECRET_KEY", "")
    if key:
        if len(key) < 32:
            raise ImproperlyConfigured("SECRET_KEY is shorter than 32 characters: use a long random value.")
        return key
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        path.write_text(key)
        path.chmod(0o600)
        return key


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "channels",
    "coordination",
    "dashboard",
]

MIDDLEWARE = [
    # Leaves itself out unless OpenTelemetry traces are on (OTEL_EXPORTER_OTLP_ENDPOINT; am_project/telemetry.py).
    "coordination.middleware.tracing",
    "coordination.middleware.server_timing",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "am_project.urls"
WSGI_APPLICATION = "am_project.wsgi.application"
ASGI_APPLICATION = "am_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: DATABASE_URL, else the embedded PostgreSQL.
_database_url = env_url("DATABASE_URL", ("postgres", "postgresql", "postgis"))
_conn_max_age = env_int("AM_DB_CONN_MAX_AGE", 0, minimum=0)
if _database_url:
    try:
        _default_db = dj_database_url.parse(_database_url, conn_max_age=_conn_max_age)
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL could not be parsed: {exc}") from None
else:
    _pg = embedded.ensure_postgres(VAR_DIR)
    _default_db = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _pg.name,
        "USER": _pg.user,
        "HOST": _pg.host,
        "PORT": str(_pg.port),
        "CONN_MAX_AGE": _conn_max_age,
    }
_default_db.setdefault("OPTIONS", {})
_default_db["OPTIONS"].setdefault("connect_timeout", env_int("AM_DB_CONNECT_TIMEOUT_S", 5, minimum=1))
# Parameters bound by the server, and a statement run 5 times on a connection kept prepared there (parsed and
# planned once): a third of the time of a pull + report cycle was PostgreSQL planning its statements
# (BENCHMARKS.md section 8). Off (AM_DB_PREPARED_STATEMENTS=0) behind a pooler in transaction mode
# (PgBouncer before 1.21), which cannot keep a prepared statement on a connection. With server-side binding a
# query may not put one parameter in both SELECT and GROUP BY (Django ticket #34255), nor send several
# statements in one execute: the code here does neither, and the whole test suite runs with it on.
if env_bool("AM_DB_PREPARED_STATEMENTS", True):
    _default_db["OPTIONS"].setdefault("server_side_binding", True)
    _default_db["OPTIONS"].setdefault("prepare_threshold", 5)
_default_db["CONN_HEALTH_CHECKS"] = _conn_max_age > 0
# A pool of connections per process (psycopg_pool), instead of a connection per request.
if env_bool("AM_DB_POOL", False) and _conn_max_age == 0:
    _default_db["OPTIONS"]["pool"] = {
        "min_size": env_int("AM_DB_POOL_MIN", 2, minimum=0),
        "max_size": env_int("AM_DB_POOL_MAX", 20, minimum=1),
        "timeout": env_float("AM_DB_POOL_TIMEOUT_S", 3.0, minimum=0.1),
    }
_default_db["TEST"] = {"NAME": env_str("AM_TEST_DATABASE_NAME", "test_am")}
DATABASES = {"default": _default_db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: REDIS_URL, else the embedded Redis.
REDIS_URL = env_url("REDIS_URL", ("redis", "rediss", "unix")) or embedded.ensure_redis(VAR_DIR)


def _celery_broker_url(url: str) -> str:
    """Kombu spells a Unix-socket Redis as redis+socket://path?virtual_host=db."""
    if not url.startswith("unix://"):
        return url
    parts = urlsplit(url)
    db = parse_qs(parts.query).get("db", ["0"])[0]
    return f"redis+socket://{parts.path}?virtual_host={db}"


CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": env_str("AM_CHANNEL_PREFIX", "am")},
    }
}

CELERY_BROKER_URL = _celery_broker_url(REDIS_URL)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = env_str("AM_CELERY_QUEUE", "am")
CELERY_TIMEZONE = "UTC"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    # Where workspace contents above AM_WORKSPACE_INLINE_MAX_BYTES go when AM_WORKSPACE_STORAGE=workspace;
    # replace the backend (S3, GCS... through django-storages) to keep them elsewhere.
    "workspace": {"BACKEND": "django.core.files.storage.FileSystemStorage",
                  "OPTIONS": {"location": str(VAR_DIR / "workspace-blobs")}},
}
WHITENOISE_USE_FINDERS = True

# A request body larger than this is refused with 413 before it is parsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("AM_MAX_BODY_BYTES", 2 * 1024 * 1024, minimum=1024)

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["coordination.api.parsers.LimitedJSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "coordination.api.auth.BearerTokenAuthentication",
        "coordination.api.auth.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["coordination.api.auth.IsAuthenticated"],
    "EXCEPTION_HANDLER": "coordination.api.errors.exception_handler",
    "COERCE_DECIMAL_TO_STRING": False,
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "AgentManager worker API",
    "DESCRIPTION": (
        "The contract between AgentManager and the workers that run agents (shared/api-v1.md). "
        "Authenticate with `Authorization: Bearer <token>`. Every error is "
        '`{"error": "<code>", "detail": "<sentence>"}`.'
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # additionalProperties: false on strict bodies; 400/413/415/503 on every operation (coordination/api/schema.py).
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "coordination.api.schema.postprocess"],
    "APPEND_COMPONENTS": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
    },
    "SECURITY": [{"bearerAuth": []}],
}

# AgentManager knobs.
AM_DEFAULT_LEASE_TTL_S = env_int("AM_DEFAULT_LEASE_TTL_S", 120, minimum=5, maximum=86400)
AM_MAX_LEASE_TTL_S = env_int("AM_MAX_LEASE_TTL_S", 3600, minimum=5, maximum=7 * 86400)
AM_DEFAULT_MAX_ATTEMPTS = env_int("AM_DEFAULT_MAX_ATTEMPTS", 3, minimum=1, maximum=100)
AM_MAX_STEPS_PER_WORKFLOW = env_int("AM_MAX_STEPS_PER_WORKFLOW", 10000, minimum=1)
AM_SWEEP_INTERVAL_S = env_float("AM_SWEEP_INTERVAL_S", 5.0, minimum=0.5)
AM_RETRY_BACKOFF_BASE_S = env_float("AM_RETRY_BACKOFF_BASE_S", 2.0, minimum=0.0)
AM_RETRY_BACKOFF_MAX_S = env_float("AM_RETRY_BACKOFF_MAX_S", 300.0, minimum=0.0)
AM_AGENT_ONLINE_WINDOW_S = env_int("AM_AGENT_ONLINE_WINDOW_S", 60, minimum=1)
AM_DEMO = env_bool("AM_DEMO", True)

# The workspace: the largest file AM accepts; where large contents go (a STORAGES alias; "" keeps every
# content in PostgreSQL) and above what size they go there.
AM_MAX_FILE_BYTES = env_int("AM_MAX_FILE_BYTES", 8 * 1024 * 1024, minimum=1024)
AM_WORKSPACE_STORAGE = env_str("AM_WORKSPACE_STORAGE", "")
AM_WORKSPACE_INLINE_MAX_BYTES = env_int("AM_WORKSPACE_INLINE_MAX_BYTES", 1024 * 1024, minimum=0)
AM_MAX_ARCHIVE_FILES = env_int("AM_MAX_ARCHIVE_FILES", 10000, minimum=1)
AM_MAX_ARCHIVE_BYTES = env_int("AM_MAX_ARCHIVE_BYTES", 200 * 1024 * 1024, minimum=1024)

# The server's LLM (planner, auditor, synthesis): none, scripted (offline) or openai (any compatible endpoint).
AM_LLM = env_str("AM_LLM", "none")
if AM_LLM not in ("none", "scripted", "openai"):
    raise ImproperlyConfigured(f"AM_LLM={AM_LLM!r} is not one of: none, scripted, openai.")
AM_LLM_BASE_URL = env_str("AM_LLM_BASE_URL", "")
AM_LLM_MODEL = env_str("AM_LLM_MODEL", "gpt-4o-mini")
AM_LLM_API_KEY = env_str("AM_LLM_API_KEY", "")
AM_LLM_JSON_MODE = env_bool("AM_LLM_JSON_MODE", True)
AM_LLM_PRICE_PROMPT_PER_MTOK = env_float("AM_LLM_PRICE_PROMPT_PER_MTOK", 0.0, minimum=0.0)
AM_LLM_PRICE_COMPLETION_PER_MTOK = env_float("AM_LLM_PRICE_COMPLETION_PER_MTOK", 0.0, minimum=0.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("AM_LOG_LEVEL", "INFO")},
    "loggers": {"pgserver": {"level": "WARNING"}},
}
