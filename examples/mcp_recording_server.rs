//! A small stdio MCP server the tests and the benchmark put behind `signoff mcp-proxy`: it
//! appends every tool call it receives (name and arguments) as a JSON line to the file named
//! by `RECORD_FILE`, so a test can tell exactly what reached it.

use std::io::Write as _;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, ListPromptsResult, ListToolsResult, PaginatedRequestParams,
    Prompt, PromptMessage, Role, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt as _};
use serde_json::{json, Map, Value};

struct RecordingServer;

fn object_schema() -> std::sync::Arc<Map<String, Value>> {
    let Value::Object(schema) = json!({"type": "object", "additionalProperties": true}) else {
        unreachable!("a literal object")
    };
    std::sync::Arc::new(schema)
}

fn record(name: &str, arguments: &Value) {
    if let Ok(path) = std::env::var("RECORD_FILE") {
        let line = json!({"tool": name, "arguments": arguments}).to_string();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open RECORD_FILE");
        writeln!(file, "{line}").expect("write RECORD_FILE");
    }
}

impl ServerHandler for RecordingServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .build(),
        )
        .with_instructions("records every call")
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let tool = |name: &'static str, description: &'static str| {
            Tool::new(name, description, object_schema())
        };
        Ok(ListToolsResult::with_all_items(vec![
            tool("echo", "Answers its arguments."),
            tool(
                "get",
                "Answers its arguments (a read: the benchmark's allowed call).",
            ),
            tool("send_email", "Pretends to send an email."),
            tool("delete_table", "Pretends to drop a table."),
            tool("fail", "Always fails (an isError result)."),
            tool("crash", "Exits the server at once."),
        ]))
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        Ok(ListPromptsResult::with_all_items(vec![Prompt::new(
            "greeting",
            Some("A fixed greeting."),
            None,
        )]))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        Ok(GetPromptResult::new(vec![PromptMessage::new_text(
            Role::User,
            format!("hello from the {} prompt", request.name),
        )])
        .into())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        record(&request.name, &arguments);
        let result = match &*request.name {
            "crash" => {
                eprintln!("recording server: crashing on purpose");
                std::process::exit(3)
            }
            "fail" => CallToolResult::error(vec![ContentBlock::text("failed on purpose")]),
            _ => CallToolResult::success(vec![ContentBlock::text(arguments.to_string())]),
        };
        Ok(result.into())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    eprintln!("recording server: started");
    // Which SIGNOFF_ variables it was started with, so a test can tell what it inherited.
    if let Ok(path) = std::env::var("ENVIRONMENT_FILE") {
        let names: Vec<String> = std::env::vars()
            .map(|(name, _)| name)
            .filter(|name| name.starts_with("SIGNOFF_"))
            .collect();
        std::fs::write(path, names.join("\n"))?;
    }
    let running = RecordingServer.serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
    Ok(())
}
