"""schemathesis against the server's own /openapi.json (issue 28): requests made from the schema, valid and
invalid ones, a bounded number and the same every run (deterministic generation), must never get a server error,
and every answer's status and body must be what the schema declares for it."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from test_server import Server

ST = Path(sys.executable).with_name("schemathesis")  # installed with the test extras, beside this Python
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"

pytestmark = pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed (pip install -e .[test])")


@pytest.fixture(scope="module")
def server(chat_ckpt):
    s = Server(1, chat_ckpt, "--max-new-tokens", "4")
    yield s
    s.stop()


def schemathesis(schema: str, server: Server) -> subprocess.CompletedProcess:
    cmd = [str(ST), "run", schema, "--url", server.url, "--checks", CHECKS, "--max-examples", "25"]
    cmd += ["--generation-deterministic", "--no-color", "--request-timeout", "60"]
    # in a temporary folder: schemathesis keeps a cache (.schemathesis/) where it runs
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=folder)


def test_every_answer_is_what_openapi_json_declares(server):
    run = schemathesis(f"{server.url}/openapi.json", server)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout
    for endpoint in ("chat", "completions"):  # real replies were checked too, not only refusals
        assert server.metric(f'tp_infer_requests_total{{endpoint="{endpoint}",status="200"}}') > 0
        assert server.metric(f'tp_infer_requests_total{{endpoint="{endpoint}",status="400"}}') > 0
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_the_checks_catch_a_status_the_schema_does_not_declare(server, tmp_path):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    del schema["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    run = schemathesis(str(tmp_path / "openapi.json"), server)
    assert run.returncode != 0 and "Undocumented status code" in run.stdout, run.stdout[-3000:]
