"""The control API fuzzed against its own OpenAPI description (schemathesis), on a real
controller process: every response is documented and well-formed, none is a 5xx, and the
process is still serving afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvcore.control.client import ControllerClient  # noqa: E402

TOKEN = "fuzz-token"
EXAMPLES = 30


@pytest.fixture(scope="module")
def controller_url() -> Iterator[str]:
    env = {**os.environ, "KVCORE_CONTROLLER_TOKEN": TOKEN, "KVCORE_CONTROLLER_POLL_S": "0.05",
           "KVCORE_CONTROLLER_COMMAND_TIMEOUT_S": "0.05", "KVCORE_CONTROLLER_MAX_TOKENS": "4096",
           "KVCORE_CONTROLLER_MAX_BODY_BYTES": "256KiB"}
    proc = subprocess.Popen([sys.executable, "-m", "kvcore.cli.main", "controller", "--port",
                             "0"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, line
    yield line.split()[-1]
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    assert proc.returncode is not None


def test_openapi_fuzz(controller_url: str) -> None:
    schema = schemathesis.openapi.from_url(controller_url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    fuzzed = []
    for operation in operations:
        for with_token in (True, False):
            headers = {"Authorization": f"Bearer {TOKEN}"} if with_token else {}

            @settings(max_examples=EXAMPLES if with_token else 5, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck),
                      phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy())
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers, checks=checks)

            run()
        fuzzed.append(operation.label)
    assert "POST /v1/move" in fuzzed
    health = ControllerClient(controller_url, TOKEN).health()
    assert health["status"] == "ok"
