"""An agent's view of skill-manager through the official MCP Python SDK (`mcp`):
initialize over Streamable HTTP with the agent's bearer token, list the tools, and
optionally call one, TIMES times in the session (default once). Prints one JSON
object; the Rust test asserts on it ("call" is the first call, "calls" all of them).

    python3 mcp_skills_check.py URL TOKEN [TOOL JSON_ARGS [TIMES]]
"""
import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client


async def call(session, tool, args):
    try:
        r = await session.call_tool(tool, json.loads(args))
        return {
            "is_error": bool(r.is_error),
            "text": [c.text for c in r.content if getattr(c, "type", "") == "text"],
        }
    except Exception as e:  # a JSON-RPC error (unknown tool) is an answer too
        return {"rpc_error": str(e)}


async def main(url, token, tool=None, args=None, times="1"):
    out = {}
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                out["server"] = init.server_info.name
                tools = await session.list_tools()
                out["tools"] = [
                    {"name": t.name, "description": t.description, "schema": t.input_schema}
                    for t in tools.tools
                ]
                if tool:
                    out["calls"] = [await call(session, tool, args) for _ in range(int(times))]
                    out["call"] = out["calls"][0]
    print(json.dumps(out))


asyncio.run(main(*sys.argv[1:]))
