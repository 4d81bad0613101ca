from django.core.management.base import BaseCommand, CommandError

from coordination.services import agent_registry
from coordination.errors import ServiceError


class Command(BaseCommand):
    help = (
        "Register an agent (a worker identity) and print its bearer token. "
        "The token is printed once, alone on the last line; only its hash is stored."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="A unique name, e.g. dev-laptop-1.")
        parser.add_argument("--roles", required=True, help="Comma-separated roles, e.g. developer,tester.")
        parser.add_argument("--capacity", type=int, default=1, help="Steps it may hold at once (default 1).")
        parser.add_argument(
            "--can-submit",
            action="store_true",
            help="Let this token create and control workflows (a pipeline, or a planning agent).",
        )

    def handle(self, *args, name, roles, capacity, can_submit, **options):
        try:
            agent, token = agent_registry.agent_create(
                name=name, roles=agent_registry.parse_roles(roles), capacity=capacity, can_submit=can_submit
            )
        except ServiceError as exc:
            raise CommandError(exc.detail) from None
        self.stdout.write(
            f"Created agent {agent.name} ({agent.id}) with roles {', '.join(agent.roles)}, "
            f"capacity {agent.capacity}{', may submit workflows' if agent.can_submit else ''}."
        )
        self.stdout.write("Its token follows; store it now, it cannot be shown again:")
        self.stdout.write(token)
