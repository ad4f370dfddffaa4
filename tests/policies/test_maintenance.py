from __future__ import annotations

import pytest
from pydantic import ValidationError

from meshgate.policies import PolicyChain, PolicyError
from meshgate.policies.maintenance import MaintenanceConfig


def test_defaults_answer_503_problem(chain, make_exchange, read_problem) -> None:
    answer = chain("maintenance").rewrite(make_exchange("POST", "/anything"))
    assert answer is not None and answer.status == 503
    doc = read_problem(answer)
    assert doc["title"] == "Service Unavailable"
    assert doc["detail"] == "The service is down for maintenance."
    assert "retry-after" not in answer.headers


def test_status_message_and_retry_after(chain, make_exchange, read_problem) -> None:
    policy = chain(
        "maintenance", status=502, message="Back at 14:00 UTC \u2014 sorry", retry_after=120
    )
    answer = policy.rewrite(make_exchange())
    assert answer is not None and answer.status == 502
    assert read_problem(answer) == {
        "type": "about:blank",
        "title": "Bad Gateway",
        "status": 502,
        "detail": "Back at 14:00 UTC \u2014 sorry",
    }
    assert answer.headers.get("retry-after") == "120"


def test_status_without_a_standard_phrase(chain, make_exchange, read_problem) -> None:
    answer = chain("maintenance", status=599).rewrite(make_exchange())
    assert answer is not None and read_problem(answer)["title"] == "Maintenance"


def test_each_answer_is_fresh(chain, make_exchange) -> None:
    # The response phase edits headers of local answers; one must not leak into the next.
    policy = chain("maintenance", retry_after=0)
    first = policy.rewrite(make_exchange())
    assert first is not None
    first.headers.add("x-edited", "1")
    second = policy.rewrite(make_exchange())
    assert second is not None and "x-edited" not in second.headers
    assert second.headers.get_all("retry-after") == ["0"]


def test_answers_before_access_and_other_policies(make_exchange) -> None:
    chain = PolicyChain.build([{"maintenance": {}}, {"ip_filter": {"deny": ["0.0.0.0/0"]}}])
    answer = chain.rewrite(make_exchange())
    assert answer is not None and answer.status == 503


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"status": 200}, "greater than or equal to 400"),
        ({"status": 600}, "less than or equal to 599"),
        ({"retry_after": -5}, "greater than or equal to 0"),
        ({"message": "x" * 5000}, "at most 4096 characters"),
        ({"status": 503, "content_type": "text/plain"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs(config, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MaintenanceConfig.model_validate(config)
    with pytest.raises(PolicyError, match=r"policies\[0\] maintenance: "):
        PolicyChain.build([{"maintenance": config}])
