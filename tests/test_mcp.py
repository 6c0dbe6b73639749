"""MCP tools (``SUPPORTLM_MCP=1``) listed and called with the ``mcp`` client package.

Gradio's MCP server (streamable HTTP at ``/gradio_api/mcp/``) serves the documented API
endpoints as tools; the app's own server mounts it next to ``/v1``.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import serving
from test_openai_api import start

mcp = pytest.importorskip("mcp", reason="SUPPORTLM_MCP needs gradio[mcp] (requirements.txt)")
from mcp.client.streamable_http import streamablehttp_client  # noqa: E402


async def tools_and_call(url: str, tool: str, arguments: dict, headers: dict | None = None):
    transport = streamablehttp_client(f"{url}/gradio_api/mcp/", headers=headers)
    async with transport as (read, write, _), mcp.ClientSession(read, write) as session:
        await session.initialize()
        tools = {t.name: t for t in (await session.list_tools()).tools}
        result = await session.call_tool(tool, arguments)
    return tools, result


@pytest.fixture(scope="module")
def mcp_server(tiny_chat_model_dir, tmp_path_factory):
    _, app = start(tiny_chat_model_dir, tmp_path_factory.mktemp("mcp"), mcp=1)
    with serving(app) as url:
        yield url


def test_the_assistant_s_tools_are_listed_with_their_docs_and_answer(mcp_server):
    tools, result = asyncio.run(
        tools_and_call(mcp_server, "chat", {"message": "Where is my order?", "max_new_tokens": 8})
    )
    # Only the three documented tools: not feedback, reload_adapter, header, info or a lambda.
    assert set(tools) == {"chat", "summarize", "translate"}
    assert "customer" in tools["chat"].description
    assert tools["summarize"].inputSchema["properties"]["style"]["description"]
    assert not result.isError and result.content[0].text.strip()


def test_a_summary_through_mcp(mcp_server):
    _, result = asyncio.run(tools_and_call(
        mcp_server, "summarize", {"text": "My parcel is late. " * 20, "max_new_tokens": 8}
    ))  # fmt: skip
    assert not result.isError and result.content[0].text.strip()


def test_mcp_needs_the_key_when_one_is_set(tiny_chat_model_dir, tmp_path_factory):
    _, app = start(tiny_chat_model_dir, tmp_path_factory.mktemp("mcp-key"), mcp=1, api_key="k1")
    with serving(app) as url:
        with pytest.raises(BaseException) as refused:  # the client raises inside a task group
            asyncio.run(tools_and_call(url, "chat", {"message": "hi"}))
        assert "401" in repr(refused.value) or "Unauthorized" in repr(refused.value)
        tools, _ = asyncio.run(tools_and_call(
            url, "chat", {"message": "hi", "max_new_tokens": 2}, {"Authorization": "Bearer k1"}
        ))  # fmt: skip
    assert "chat" in tools
