//! relay's MCP tools as relay-server lists them (names, descriptions, input and output
//! schemas), as JSON. `relay mcp` offers them before it can reach any server: Claude Code
//! asks an MCP server for its tools once, when it starts, which may be before relayd runs
//! or the pane is attached. relay-server's test `relay_proto_holds_the_tools_the_server_lists`
//! keeps this file equal to the server's own list (`RELAY_BLESS=1` rewrites it).

/// A JSON array of MCP `Tool` objects.
pub const DEFINITIONS: &str = include_str!("tools.json");

/// Where [`DEFINITIONS`] lives in the source tree, for the test that rewrites it.
pub const DEFINITIONS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/tools.json");

#[cfg(test)]
mod tests {
    #[test]
    fn the_definitions_are_tools_with_names_and_schemas() {
        let tools: Vec<serde_json::Value> = serde_json::from_str(super::DEFINITIONS).unwrap();
        assert!(tools.len() >= 8);
        for tool in &tools {
            assert!(tool["name"].is_string() && tool["inputSchema"].is_object(), "{tool}");
        }
    }
}
