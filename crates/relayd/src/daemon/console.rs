//! The console on a server, for this user's human there: sign-in links, signing out
//! everywhere, pairing another machine's relayd.

use relay_proto::local::ConsoleAction;

use super::*;

impl Daemon {
    /// What the pane's agent is doing (its sidebar says every minute, and on each change),
    /// passed on to each server the pane is attached to, for the console's peers panel.
    pub(super) fn tell_activity(&self, pane: &str, activity: String) {
        for a in self.attachments_of(pane) {
            let a = a.attachment;
            let Some(token) = self.daemon_token(&a.server) else { continue };
            let (api, activity) = (self.api.clone(), activity.clone());
            tokio::spawn(async move {
                if let Err(e) = api.activity(&a.server, &token, &a.peer_id, &activity).await {
                    tracing::debug!(server = %a.server, error = %e, "could not pass on what the agent is doing");
                }
            });
        }
    }

    pub async fn console(&self, server: Option<String>, action: ConsoleAction) -> Result<Reply, Failure> {
        let server = Config::normalize_server(server.as_deref().unwrap_or(&self.config.server));
        let token = self.credential(&server).await?;
        let answer = self.api.console(&server, &token, &action).await.map_err(server_failure)?;
        let url = answer.path.map(|path| format!("{server}{path}"));
        Ok(Reply::Console { human: answer.human.unwrap_or_default(), url, code: answer.code, expires_at: answer.expires_at, server })
    }
}
