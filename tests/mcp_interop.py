"""Interoperability: the official Python MCP SDK drives signoff's /mcp and `signoff mcp-proxy`.

Run by tests/integration/mcp.rs as:
    python mcp_interop.py http URL KEY
    python mcp_interop.py proxy SIGNOFF_BINARY URL KEY UPSTREAM_BINARY
Prints one line per check and exits non-zero on the first failure.
"""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def text_of(result):
    return "\n".join(getattr(block, "text", "") for block in result.content)


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", flush=True)
        sys.exit(1)
    print(f"ok: {message}", flush=True)


async def over_http(url, key):
    client = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with client, streamable_http_client(f"{url}/mcp", http_client=client) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            names = sorted(tool.name for tool in tools.tools)
            check(
                names
                == ["await_decision", "cancel_request", "check_policy", "report_execution", "request_approval"],
                f"/mcp lists the five tools: {names}",
            )
            allowed = await session.call_tool("request_approval", {"action": "reports.get", "args": {"n": 1}})
            check(not allowed.is_error, "an allowed request is not an error")
            check(allowed.structured_content["status"] == "approved", "structuredContent is the request object")
            denied = await session.call_tool("request_approval", {"action": "db.drop_users"})
            check(not denied.is_error, "a denial is a normal result")
            check("Dropping tables is never allowed" in text_of(denied), "the denial's text names the reason")
            bad = await session.call_tool("request_approval", {"args": {}})
            check(bad.is_error, "a missing action is an isError result")


async def through_proxy(signoff, url, key, upstream):
    parameters = StdioServerParameters(
        command=signoff,
        args=["mcp-proxy", "--url", url, "--key", key, "--wait", "2s", "--", upstream],
    )
    async with stdio_client(parameters) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            names = [tool.name for tool in tools.tools]
            check("echo" in names and "delete_table" in names, f"the proxy offers the upstream's tools: {names}")
            echoed = await session.call_tool("echo", {"text": "from python"})
            check(not echoed.is_error and "from python" in text_of(echoed), "an allowed call runs upstream")
            denied = await session.call_tool("delete_table", {"table": "users"})
            check(denied.is_error, "a denied call is an isError result")
            check("Dropping tables is never allowed" in text_of(denied), "naming the reason")


def main():
    mode = sys.argv[1]
    if mode == "http":
        asyncio.run(over_http(sys.argv[2], sys.argv[3]))
    elif mode == "proxy":
        asyncio.run(through_proxy(*sys.argv[2:6]))
    else:
        sys.exit(f"unknown mode {mode!r}")
    print(json.dumps({"passed": mode}), flush=True)


if __name__ == "__main__":
    main()
