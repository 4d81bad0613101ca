"""Request serializers build their fields as shallow copies of the declared ones (`StrictSerializer.get_fields`):
each instance still has fields of its own, and instances used at once in threads do not mix their results."""

import threading
import uuid

from coordination.api.serializers import ReportInSerializer


def _body(i: int) -> dict:
    return {"step_id": str(uuid.UUID(int=i)), "lease_token": f"token-{i}", "status": "completed",
            "final_result": f"result {i}", "usage": {"model": f"m{i}", "prompt_tokens": i, "cost_usd": i / 100},
            "iterations": [{"iteration": j, "thought": f"t{i}.{j}"} for j in range(3)]}


class StrictSerializerFieldTests:
    def test_each_instance_has_fields_of_its_own(self):
        first, second = ReportInSerializer(data=_body(1)), ReportInSerializer(data=_body(2))
        assert first.fields["status"] is not second.fields["status"]
        assert first.fields["status"].parent is first and second.fields["status"].parent is second
        assert first.fields["usage"] is not second.fields["usage"]
        assert first.fields["usage"].fields["model"] is not second.fields["usage"].fields["model"]
        assert first.fields["usage"].fields["model"].root is first
        # A list's child too: each copy has its own, bound to it.
        assert first.fields["iterations"].child is not second.fields["iterations"].child
        assert first.fields["iterations"].child.parent is first.fields["iterations"]
        assert first.fields["iterations"].child.root is first
        assert ReportInSerializer._declared_fields["status"].parent is None  # the declared ones stay unbound

    def test_instances_validating_at_once_keep_their_own_data_and_errors(self):
        failures: list = []

        def validate(i: int) -> None:
            for _ in range(50):
                good = ReportInSerializer(data=_body(i))
                bad = ReportInSerializer(data={**_body(i), "usage": {"prompt_tokens": -i - 1}})
                if not good.is_valid() or good.validated_data["usage"]["model"] != f"m{i}" \
                        or good.validated_data["iterations"][2]["thought"] != f"t{i}.2":
                    failures.append((i, good.errors))
                if bad.is_valid() or "prompt_tokens" not in bad.errors.get("usage", {}):
                    failures.append((i, "bad body accepted"))

        threads = [threading.Thread(target=validate, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]
