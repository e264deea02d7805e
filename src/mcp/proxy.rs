//! `signoff mcp-proxy`: a stdio MCP gateway that asks signoff before every tool call.
