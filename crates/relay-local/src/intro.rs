//! How relay introduces itself to an agent that cannot be told through its inbox.

/// The one line typed into the agent to introduce it.
pub fn intro_line(display_name: &str, group: &str) -> String {
    format!(
        "[RELAY] You are {display_name} in relay group {group}. Messages from other agents will be announced \
         here; read them with the relay tool read_new_messages."
    )
}
