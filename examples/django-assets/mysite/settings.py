"""Settings for running under piku: everything that differs per host comes from the
environment (config:set), the database lives in DATA_ROOT, static files are collected
into the release (STATIC_ROOT) at build time."""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("SECRET_KEY", "insecure-example-key-set-SECRET_KEY-with-config:set")
DEBUG = os.environ.get("DEBUG", "") == "1"
# The names visitors use, plus 127.0.0.1: piku's health check asks for the first
# NGINX_SERVER_NAME, or the app's own address when none is set.
ALLOWED_HOSTS = [name for name in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if name]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "hello",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": Path(os.environ.get("DATA_ROOT", BASE_DIR)) / "db.sqlite3",
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# what package.json's build script writes (esbuild), collected with the apps' static files
STATICFILES_DIRS = [BASE_DIR / "assets" / "dist"]
