"""A malformed variable stops start-up with a message naming it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from am_project.env import env_bool, env_float, env_int, env_list, env_url

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def _start(**overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **overrides}
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )


class EnvHelperTests:
    def test_it_names_the_variable_of_a_bad_integer(self):
        with pytest.raises(ImproperlyConfigured, match="AM_X='twelve' is not a whole number"):
            env_int("AM_X", 1, environ={"AM_X": "twelve"})

    def test_it_enforces_bounds(self):
        with pytest.raises(ImproperlyConfigured, match="AM_X=0 is below its minimum of 1"):
            env_int("AM_X", 5, minimum=1, environ={"AM_X": "0"})
        with pytest.raises(ImproperlyConfigured, match="above its maximum"):
            env_int("AM_X", 5, maximum=10, environ={"AM_X": "11"})

    def test_it_reads_booleans_and_refuses_others(self):
        assert env_bool("D", False, environ={"D": "yes"}) is True
        assert env_bool("D", True, environ={"D": "0"}) is False
        with pytest.raises(ImproperlyConfigured, match="D='maybe' is not a boolean"):
            env_bool("D", False, environ={"D": "maybe"})

    def test_it_refuses_non_finite_floats(self):
        with pytest.raises(ImproperlyConfigured, match="not a finite number"):
            env_float("F", 1.0, environ={"F": "nan"})

    def test_it_refuses_empty_list_items(self):
        with pytest.raises(ImproperlyConfigured, match="ALLOWED_HOSTS"):
            env_list("ALLOWED_HOSTS", [], environ={"ALLOWED_HOSTS": "a,,b"})

    def test_it_refuses_a_url_of_the_wrong_scheme(self):
        with pytest.raises(ImproperlyConfigured, match="DATABASE_URL has scheme 'mysql'"):
            env_url("DATABASE_URL", ("postgres", "postgresql"), environ={"DATABASE_URL": "mysql://x/y"})
        with pytest.raises(ImproperlyConfigured, match="is not a URL"):
            env_url("REDIS_URL", ("redis",), environ={"REDIS_URL": "localhost:6379"})

    def test_it_uses_defaults_when_unset(self):
        assert env_int("AM_X", 7, environ={}) == 7
        assert env_url("R", ("redis",), environ={}) is None


@pytest.mark.slow
class StartupTests:
    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("AM_DEFAULT_LEASE_TTL_S", "two minutes"),
            ("DEBUG", "maybe"),
            ("DATABASE_URL", "mysql://root@localhost/am"),
            ("REDIS_URL", "localhost:6379"),
            ("AM_SWEEP_INTERVAL_S", "-1"),
        ],
    )
    def test_it_stops_start_up_naming_a_malformed_variable(self, variable, value):
        result = _start(**{variable: value})
        assert result.returncode != 0
        assert "ImproperlyConfigured" in result.stderr
        assert variable in result.stderr.strip().splitlines()[-1]

    def test_it_starts_with_valid_settings(self):
        result = _start(AM_DEFAULT_LEASE_TTL_S="300")
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize(("value", "options"), [(None, "True 5"), ("0", "None None")])
    def test_prepared_statements_are_on_unless_turned_off(self, value, options):
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "am_project.settings"}
        env.pop("AM_DB_PREPARED_STATEMENTS", None)
        if value is not None:
            env["AM_DB_PREPARED_STATEMENTS"] = value
        result = subprocess.run(
            [sys.executable, "-c", "import django; django.setup(); from django.conf import settings; "
             "o = settings.DATABASES['default']['OPTIONS']; "
             "print(o.get('server_side_binding'), o.get('prepare_threshold'))"],
            cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == options
