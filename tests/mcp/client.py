"""A real MCP client (the official Python SDK, `mcp` on PyPI) driving `command-poller mcp`.

Usage: client.py BINARY [ARGS...]  (stdio: the front door's command line; its environment is ours)
       client.py http://HOST:PORT/mcp  (streamable HTTP, bearer token from MCP_TOKEN)
Reads one JSON request per line on stdin, answers one JSON line per request on stdout:
  {"list": true}                         -> {"tools": [{name, description, inputSchema, annotations}]}
  {"tool": NAME, "args": {...}}          -> {"is_error", "text", "structured", "progress": [...]}
The Rust test (tests/api/mcp_e2e.rs) drives it, acting (approving, stopping the poller) between
requests.
"""
import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def transport():
    if sys.argv[1].startswith("http"):
        client = create_mcp_http_client(
            headers={"Authorization": f"Bearer {os.environ['MCP_TOKEN']}"}
        )
        return streamable_http_client(sys.argv[1], http_client=client)
    params = StdioServerParameters(command=sys.argv[1], args=sys.argv[2:], env=dict(os.environ))
    return stdio_client(params)


async def main() -> None:
    loop = asyncio.get_running_loop()
    async with transport() as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return
                req = json.loads(line)
                if req.get("list"):
                    tools = await session.list_tools()
                    # The wire form (camelCase), whatever the SDK's attribute names.
                    out = {
                        "tools": [
                            t.model_dump(by_alias=True, exclude_none=True, mode="json")
                            for t in tools.tools
                        ]
                    }
                else:
                    progress = []

                    async def on_progress(p, total, message):
                        progress.append(message)

                    r = await session.call_tool(
                        req["tool"], req.get("args", {}), progress_callback=on_progress
                    )
                    wire = r.model_dump(by_alias=True, mode="json")
                    content = wire.get("content") or []
                    out = {
                        "is_error": bool(wire.get("isError")),
                        "text": content[0].get("text", "") if content else "",
                        "structured": wire.get("structuredContent"),
                        "progress": progress,
                    }
                sys.stdout.write(json.dumps(out) + "\n")
                sys.stdout.flush()


asyncio.run(main())
