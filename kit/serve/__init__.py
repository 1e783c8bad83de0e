"""The deployed server, measured over HTTP (notebook 86).

- `deploy`: a profile's settings as llama-cpp-python's server config and as a llama-server command line, with a
  name-by-name translation; deploy files beside a profile's `.env`.
- `server`: `LlamaCppServer`, a real server the kit starts on 127.0.0.1 and always stops; `Endpoint`;
  `check_endpoint` for a server someone else started.
- `client`: the asyncio/httpx load generator (closed loop, Poisson arrivals), per-request TTFT, ITL, TPOT, e2e,
  finish reason and truncation.

The study that uses them (notebook 86) is kit.studies.server.
"""
from kit.serve.client import Load, run_load, stream_request, tpot_ms
from kit.serve.deploy import llama_server_command, request_fields, server_config, translation, write_deploy_files
from kit.serve.server import CommandServer, Endpoint, LlamaCppServer, ServerError, check_endpoint

__all__ = [
    "CommandServer", "Endpoint", "LlamaCppServer", "Load", "ServerError", "check_endpoint", "llama_server_command",
    "request_fields", "run_load", "server_config", "stream_request", "tpot_ms", "translation", "write_deploy_files",
]
