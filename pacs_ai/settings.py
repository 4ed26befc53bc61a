"""Settings, read from the environment (see the README's table of variables).

Two shapes, one file: the embedded single-host default (SQLite in WAL mode and kombu's filesystem
transport, no servers needed) and production (``DATABASE_URL=postgres://…`` and
``CELERY_BROKER_URL=redis://…``). Misconfiguration is reported by system checks in
``pacs_ai.checks``.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import dj_database_url
import django_stubs_ext

from pacs_ai.env import (
    env_bool,
    env_float,
    env_int,
    env_list,
    env_mapping,
    env_secret,
    env_str,
)

django_stubs_ext.monkeypatch()  # lets admin.ModelAdmin[Model] and friends be subscripted

BASE_DIR = Path(__file__).resolve().parent.parent
PACS_AI_DATA_DIR = Path(env_str("PACS_AI_DATA_DIR") or BASE_DIR / "var").resolve()
PACS_AI_DATA_DIR.mkdir(parents=True, exist_ok=True)

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL") or f"sqlite:///{PACS_AI_DATA_DIR / 'pacs_ai.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
# Embedded mode is the single-host default: SQLite, no servers. Everything that must be stricter
# in production keys off this one flag.
EMBEDDED = DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
if EMBEDDED:
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets the web server, listener and worker read while one of them writes; IMMEDIATE
        # takes the write lock up front, so two writers queue instead of failing mid-transaction.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": env_float("DATABASE_TIMEOUT", 20),
    }
    DATABASES["default"]["TEST"] = {"NAME": str(PACS_AI_DATA_DIR / "test_pacs_ai.sqlite3")}


def _embedded_secret_key() -> str:
    """A key made once per data directory, so the single-host mode needs no set-up."""
    path = PACS_AI_DATA_DIR / "secret_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = env_secret("DJANGO_SECRET_KEY") or (_embedded_secret_key() if EMBEDDED else "")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list(
    "DJANGO_ALLOWED_HOSTS",
    ["localhost", "127.0.0.1", "[::1]", socket.gethostname(), socket.getfqdn()],
)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("DJANGO_BEHIND_TLS_PROXY", False) else None
)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", not EMBEDDED)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "pacs_ai",
    "studies",
    "inference",
    "training",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "pacs_ai.urls"
WSGI_APPLICATION = "pacs_ai.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = PACS_AI_DATA_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": ["rest_framework.throttling.UserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": env_str("API_THROTTLE_RATE", "600/minute")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "pacs-ai API",
    "DESCRIPTION": "Studies, AI jobs and predictions. AI results are not for diagnostic use.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's files come with the sidecar package: hospital networks often have no internet.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Celery: the embedded default is kombu's filesystem transport under the data directory ----
CELERY_QUEUE_DIR = PACS_AI_DATA_DIR / "queue"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "filesystem://"
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = (
    {
        "data_folder_in": str(CELERY_QUEUE_DIR),
        "data_folder_out": str(CELERY_QUEUE_DIR),
        "control_folder": str(CELERY_QUEUE_DIR / "control"),
        "store_processed": False,
        "polling_interval": 0.2,
    }
    if CELERY_BROKER_URL.startswith("filesystem")
    else {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600)}
)
if CELERY_BROKER_URL.startswith("filesystem"):
    CELERY_QUEUE_DIR.mkdir(exist_ok=True)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
# Models run only on hosts that consume "inference" (GPU hosts in a multi-host deployment).
CELERY_TASK_ROUTES = {"worker.tasks.run_inference": {"queue": "inference"}}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BEAT_SCHEDULE_FILENAME = str(PACS_AI_DATA_DIR / "celerybeat-schedule")
SERIES_SWEEP_INTERVAL = env_float("SERIES_SWEEP_INTERVAL", 2.0)

# --- Web server (gunicorn, started by the `pacs-ai run` launcher) ------------------------------
WEB_BIND = env_str("WEB_BIND", "0.0.0.0:8000")  # all interfaces: browsers on other hosts use it

# --- DICOM listener --------------------------------------------------------------------------
DICOM_AE_TITLE = env_str("DICOM_AE_TITLE", "PACS_AI")
DICOM_BIND = env_str("DICOM_BIND", "0.0.0.0")  # noqa: S104 - a PACS on another host must reach it
DICOM_PORT = env_int("DICOM_PORT", 11112)
DICOM_ACCEPT_ALL = env_bool("DICOM_ACCEPT_ALL", EMBEDDED)
# Calling AE titles allowed to store besides DicomNode rows: "AE" or "AE@ip".
DICOM_ALLOWED_AETS = env_list("DICOM_ALLOWED_AETS", [])
DICOM_MAX_ASSOCIATIONS = env_int("DICOM_MAX_ASSOCIATIONS", 16)
DICOM_MIN_FREE_DISK_MB = env_int("DICOM_MIN_FREE_DISK_MB", 1024)
DICOM_FSYNC = env_bool("DICOM_FSYNC", True)
DICOM_TLS_CERT = env_str("DICOM_TLS_CERT")
DICOM_TLS_KEY = env_str("DICOM_TLS_KEY")
DICOM_TLS_CA = env_str("DICOM_TLS_CA")
DICOM_STORAGE_DIR = Path(env_str("DICOM_STORAGE_DIR") or PACS_AI_DATA_DIR / "dicom").resolve()
# Seconds without a new instance after which a series counts as complete; "*" is the default.
SERIES_QUIET_SECONDS = env_mapping("SERIES_QUIET_SECONDS", "CR=5,DX=5,CT=30,MR=30,*=15")

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # pynetdicom logs every PDU and, at DEBUG, dataset contents: patient data stays out.
        "pynetdicom": {"level": "WARNING"},
        "pydicom": {"level": "ERROR"},
        # highdicom logs source SOP Instance UIDs at INFO.
        "highdicom": {"level": "WARNING"},
    },
}

CELERY_BEAT_SCHEDULE = {
    "series-sweep": {
        "task": "worker.tasks.sweep_series",
        "schedule": SERIES_SWEEP_INTERVAL,
        # A sweep that waited longer than its interval is pointless: the next one is coming.
        "options": {"queue": "default", "expires": max(SERIES_SWEEP_INTERVAL * 5, 10)},
    }
}

# --- Inference ---------------------------------------------------------------------------------
INFERENCE_MODELS_DIR = Path(env_str("INFERENCE_MODELS_DIR") or PACS_AI_DATA_DIR / "models")
INFERENCE_OUTPUT_DIR = PACS_AI_DATA_DIR / "outputs"
INFERENCE_SOFT_TIME_LIMIT = env_int("INFERENCE_SOFT_TIME_LIMIT", 300)
INFERENCE_HARD_TIME_LIMIT = env_int("INFERENCE_HARD_TIME_LIMIT", 360)
# A job still queued after this long has probably lost its message; it is sent again.
INFERENCE_REQUEUE_AFTER = env_int("INFERENCE_REQUEUE_AFTER", 900)
# A job still running this many seconds past the hard time limit lost its worker; it is sent again.
INFERENCE_RECOVER_GRACE = env_int("INFERENCE_RECOVER_GRACE", 30)
# 0 lets ONNX Runtime use every core; set it lower when several workers share a host.
ORT_INTRA_OP_THREADS = env_int("ORT_INTRA_OP_THREADS", 0)
INFERENCE_RUNNER = env_str("INFERENCE_RUNNER", "onnx")  # or "torch"
# Grad-CAM: "always", "positives" (default: a CT heatmap costs ~4x its forward pass on CPU) or
# "on_demand" (only when asked for through the API).
INFERENCE_GRADCAM = env_str("INFERENCE_GRADCAM", "positives")
INFERENCE_SALIENT_SLICES = env_int("INFERENCE_SALIENT_SLICES", 8)
INFERENCE_MAX_ATTEMPTS = env_int("INFERENCE_MAX_ATTEMPTS", 3)

# --- Results out: DICOM SR and Secondary Capture C-STOREd to each destination DicomNode ----------
EXPORT_MAX_ATTEMPTS = env_int("EXPORT_MAX_ATTEMPTS", 8)
# The wait before attempt n+1 is EXPORT_RETRY_BASE * 2**(n-1) seconds, at most EXPORT_RETRY_MAX.
EXPORT_RETRY_BASE = env_float("EXPORT_RETRY_BASE", 30.0)
EXPORT_RETRY_MAX = env_float("EXPORT_RETRY_MAX", 3600.0)
# How often due outbox items are retried (a beat entry).
EXPORT_RETRY_INTERVAL = env_float("EXPORT_RETRY_INTERVAL", 30.0)
# Connect, association and DIMSE timeouts towards a destination, in seconds.
EXPORT_NETWORK_TIMEOUT = env_float("EXPORT_NETWORK_TIMEOUT", 30.0)
# Soft time limit of an export task; a claimed item is retried only after it (and a margin).
EXPORT_TIME_LIMIT = env_int("EXPORT_TIME_LIMIT", 300)
# A succeeded job with no outbox this long after it finished lost its export task: it is made
# again, for jobs that finished in the last EXPORT_RECOVER_WINDOW seconds.
EXPORT_RECOVER_AFTER = env_int("EXPORT_RECOVER_AFTER", 120)
EXPORT_RECOVER_WINDOW = env_int("EXPORT_RECOVER_WINDOW", 3 * 3600)
CELERY_BEAT_SCHEDULE["outbox-retry"] = {
    "task": "worker.tasks.retry_outbox",
    "schedule": EXPORT_RETRY_INTERVAL,
    "options": {"queue": "default", "expires": max(EXPORT_RETRY_INTERVAL * 2, 10)},
}

# --- Health and metrics ------------------------------------------------------------------------
# /api/health/ waits at most this long for the broker, then for workers to answer a ping.
HEALTH_BROKER_TIMEOUT = env_float("HEALTH_BROKER_TIMEOUT", 2.0)
HEALTH_WORKER_PING_TIMEOUT = env_float("HEALTH_WORKER_PING_TIMEOUT", 1.0)
# Empty: /metrics is open (scrape from a trusted network only). Set: Prometheus must send it
# as a bearer token.
METRICS_TOKEN = env_secret("METRICS_TOKEN")
# Names of the API schema's "status" enums, which several models share a field name for.
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"] = {
    "SeriesStatusEnum": "studies.models.Series.Status",
    "JobStatusEnum": "inference.models.InferenceJob.Status",
    "PredictionStatusEnum": "inference.models.Prediction.Status",
    "ModelVersionStatusEnum": "inference.models.ModelVersion.Status",
    "HealthStatusEnum": "pacs_ai.health.HEALTH_STATUSES",
    "ReadyStatusEnum": "pacs_ai.health.READY_STATUSES",
}
