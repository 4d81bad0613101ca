import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run a worker from the server's checkout; takes the same options as `am-worker`."

    def run_from_argv(self, argv):
        from agents.cli import main

        # Everything after `run_agent` goes to the worker's own parser (see --help).
        sys.exit(main(argv[2:]))
