//! The console on a server, for this user's human there: sign-in links, signing out
//! everywhere, pairing another machine's relayd.

use relay_proto::local::ConsoleAction;

use super::*;

impl Daemon {
    pub async fn console(&self, server: Option<String>, action: ConsoleAction) -> Result<Reply, Failure> {
        let server = Config::normalize_server(server.as_deref().unwrap_or(&self.config.server));
        let token = self.credential(&server).await?;
        let answer = self.api.console(&server, &token, &action).await.map_err(server_failure)?;
        let url = answer.path.map(|path| format!("{server}{path}"));
        Ok(Reply::Console { human: answer.human.unwrap_or_default(), url, code: answer.code, expires_at: answer.expires_at, server })
    }
}
