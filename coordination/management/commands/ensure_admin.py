import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Make sure a superuser exists, for the dashboard and the admin. With none, create "
        "AM_ADMIN_USER (default 'admin') with AM_ADMIN_PASSWORD, or a generated password kept in var/."
    )

    def handle(self, *args, **options):
        import os

        User = get_user_model()
        username = os.environ.get("AM_ADMIN_USER", "admin")
        password_file = settings.VAR_DIR / "admin_password"
        if User.objects.filter(is_superuser=True).exists():
            if User.objects.filter(username=username, is_superuser=True).exists() and password_file.exists():
                self.stdout.write(f"Log in as {username!r} with the password in {password_file}.")
            else:
                self.stdout.write("A superuser exists already; log in with its password.")
            return
        password = os.environ.get("AM_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        if not os.environ.get("AM_ADMIN_PASSWORD"):
            settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
            self.stdout.write(f"Created superuser {username!r}; password {password!r} (kept in {password_file}).")
        else:
            self.stdout.write(f"Created superuser {username!r} with the password in AM_ADMIN_PASSWORD.")
