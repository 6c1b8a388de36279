//! Attaching and detaching panes: their peers on the servers, and the daemon's credentials.

use super::*;

impl Daemon {
    pub async fn attach(self: &Arc<Self>, req: AttachRequest) -> Result<Reply, Failure> {
        let _changing = self.changing.lock().await;
        let server = Config::normalize_server(req.server.as_deref().unwrap_or(&self.config.server));
        if let Some(existing) = self.find(&req.pane, &server, &req.group) {
            return Ok(Reply::Attached { attachment: existing.attachment, already: true });
        }
        let name = self.distinct_name(&req, &server)?;
        let join_key = req.join_key.clone().or_else(|| self.config.join_keys.get(&server).cloned());
        let peer = PeerRequest {
            group: &req.group,
            hostname: &self.hostname,
            working_directory: &req.working_directory,
            git_branch: req.git_branch.as_deref(),
            name: name.as_deref(),
            join_key: join_key.as_deref(),
        };
        let token = self.credential(&server).await?;
        let registration = match self.api.register(&server, &token, &peer).await {
            Err(e) if e.is_unauthorized() => {
                // the server lost its data: the panes already here are registered again too
                self.register_again(&server, &token).await.map_err(server_failure)?;
                let token = self.daemon_token(&server).unwrap_or(token);
                self.api.register(&server, &token, &peer).await
            }
            other => other,
        }
        .map_err(server_failure)?;
        let stored = StoredAttachment {
            attachment: Attachment {
                pane: req.pane.clone(),
                server: server.clone(),
                group: registration.group_id.clone(),
                peer_id: registration.peer_id,
                display_name: registration.display_name,
                working_directory: req.working_directory.clone(),
            },
            token: registration.token,
            requested_name: name,
        };
        {
            let mut inner = lock(&self.inner);
            // A group's first pane here: its stream, about to open, starts where the pane
            // joined, so a message sent to it meanwhile is not missed.
            if let Some(after) = registration.events_after {
                inner.state.last_event_ids.entry(upstream_key(&server, &stored.attachment.group)).or_insert(after);
            }
            inner.state.attachments.push(stored.clone());
        }
        self.save_now().await;
        self.ensure_upstream(&server, &stored.attachment.group);
        tracing::info!(pane = %req.pane, %server, group = %req.group, peer = %stored.attachment.peer_id, "attached");
        Ok(Reply::Attached { attachment: stored.attachment, already: false })
    }

    /// The server knows a peer by host, directory and requested name: a second pane in the
    /// same directory and group would take over the first one's peer. It gets a name of its
    /// own instead (`host:dir-7` for pane %7), or an error if the clash is by explicit name.
    fn distinct_name(&self, req: &AttachRequest, server: &str) -> Result<Option<String>, Failure> {
        let inner = lock(&self.inner);
        let clash = inner.state.attachments.iter().find(|a| {
            a.attachment.server == server
                && a.attachment.group == req.group
                && a.attachment.working_directory == req.working_directory
                && a.attachment.pane != req.pane
                && a.requested_name == req.name
        });
        match (clash, &req.name) {
            (None, name) => Ok(name.clone()),
            (Some(other), None) => {
                let base = other.requested_name.clone().unwrap_or_else(|| other.attachment.display_name.clone());
                let base: String = base.chars().take(relay_proto::validate::MAX_NAME_CHARS - 8).collect();
                Ok(Some(format!("{base}-{}", req.pane.trim_start_matches('%'))))
            }
            (Some(other), Some(name)) => Err((
                ErrorCode::Server,
                format!(
                    "pane {} is already attached to {} as {name} from this directory; choose another --name",
                    other.attachment.pane, req.group
                ),
            )),
        }
    }

    fn find(&self, pane: &str, server: &str, group: &str) -> Option<StoredAttachment> {
        lock(&self.inner)
            .state
            .attachments
            .iter()
            .find(|a| a.attachment.pane == pane && a.attachment.server == server && a.attachment.group == group)
            .cloned()
    }

    /// The daemon's token on `server`, asking the server for one the first time.
    pub(super) async fn credential(&self, server: &str) -> Result<String, Failure> {
        match self.daemon_token(server) {
            Some(token) => Ok(token),
            None => self.new_credential(server).await,
        }
    }

    async fn new_credential(&self, server: &str) -> Result<String, Failure> {
        let (daemon_id, token) = self.api.create_daemon(server, &self.hostname).await.map_err(server_failure)?;
        lock(&self.inner).state.daemons.insert(server.to_owned(), DaemonCredential { daemon_id, token: token.clone() });
        self.save_now().await;
        Ok(token)
    }

    /// After a server lost its data: a new credential, and every local pane registered again.
    /// `refused` is the token the server did not know; if another upstream already replaced
    /// it, there is nothing left to do.
    pub async fn reregister(self: &Arc<Self>, server: &str, refused: &str) -> Result<(), ApiError> {
        let _changing = self.changing.lock().await;
        self.register_again(server, refused).await
    }

    /// [`Self::reregister`], for a caller that holds `changing`.
    // (long: one recovery in order — credential, then each pane, then the streams — whose
    // steps only make sense together)
    async fn register_again(self: &Arc<Self>, server: &str, refused: &str) -> Result<(), ApiError> {
        if self.daemon_token(server).as_deref() != Some(refused) {
            return Ok(());
        }
        // the credential an unfinished attempt made, if any: registering a pane again with it
        // finds the same peer (the server knows a peer by host, directory and name)
        let pending = lock(&self.inner).pending_daemons.remove(server);
        let DaemonCredential { daemon_id, token } = match pending {
            Some(credential) => credential,
            None => {
                let (daemon_id, token) = self.api.create_daemon(server, &self.hostname).await?;
                DaemonCredential { daemon_id, token }
            }
        };
        let attachments: Vec<StoredAttachment> =
            lock(&self.inner).state.attachments.iter().filter(|a| a.attachment.server == server).cloned().collect();
        // per group, where its first pane joined again: its stream resumes there, so nothing
        // sent to the panes since is missed
        let mut resume_after: HashMap<String, u64> = HashMap::new();
        let mut registered = Ok(());
        for old in attachments.iter() {
            let a = &old.attachment;
            let peer = PeerRequest {
                group: &a.group,
                hostname: &self.hostname,
                working_directory: &a.working_directory,
                git_branch: None,
                name: old.requested_name.as_deref(),
                join_key: self.config.join_keys.get(server).map(String::as_str),
            };
            let registration = match self.api.register(server, &token, &peer).await {
                Ok(registration) => registration,
                // this pane's own trouble (a join key of its own, say), not the server's
                Err(e) if e.is_refusal_of_the_request() => {
                    tracing::warn!(pane = %a.pane, %server, group = %a.group, error = %e, "cannot register this pane again; attach it again");
                    continue;
                }
                Err(e) => {
                    registered = Err(e);
                    break;
                }
            };
            if let Some(stored) = lock(&self.inner).state.attachments.iter_mut().find(|s| s.attachment == old.attachment) {
                stored.attachment.peer_id = registration.peer_id;
                stored.attachment.display_name = registration.display_name;
                stored.token = registration.token;
            }
            if let Some(after) = registration.events_after {
                let first = resume_after.entry(upstream_key(server, &a.group)).or_insert(after);
                *first = (*first).min(after);
            }
        }
        // The new credential is kept only once every pane has been registered with it: until
        // then the streams keep meeting 401 and the next of them goes on with it, so no pane is
        // left with a peer the server does not know.
        if let Err(e) = &registered {
            if !e.is_unauthorized() {
                lock(&self.inner).pending_daemons.insert(server.to_owned(), DaemonCredential { daemon_id, token });
            }
        } else {
            let mut inner = lock(&self.inner);
            inner.state.daemons.insert(server.to_owned(), DaemonCredential { daemon_id, token });
            // a server that lost its data numbers events from the start again
            for a in &attachments {
                let key = upstream_key(server, &a.attachment.group);
                inner.state.last_event_ids.remove(&key);
                *inner.log_restarts.entry(key).or_default() += 1;
            }
            for (key, after) in resume_after {
                if let Some(handle) = inner.upstreams.get_mut(&key) {
                    handle.status.last_event_id = after;
                }
                inner.state.last_event_ids.insert(key, after);
            }
            // every stream of this server, not only the one that met the 401, reopens now
            for handle in inner.upstreams.values().filter(|h| h.status.server == server) {
                handle.retry_now.notify_waiters();
            }
        }
        self.save_now().await;
        registered
    }

    pub async fn detach(self: &Arc<Self>, pane: &str, group: Option<&str>) -> Result<Reply, Failure> {
        let _changing = self.changing.lock().await;
        let leaving: Vec<StoredAttachment> = lock(&self.inner)
            .state
            .attachments
            .iter()
            .filter(|a| a.attachment.pane == pane && group.is_none_or(|g| a.attachment.group == g))
            .cloned()
            .collect();
        if leaving.is_empty() {
            return Err((ErrorCode::NotAttached, format!("pane {pane} is not attached{}", in_group(group))));
        }
        for a in &leaving {
            if let Some(token) = self.daemon_token(&a.attachment.server) {
                match self.api.remove_peer(&a.attachment.server, &token, &a.attachment.peer_id).await {
                    Ok(()) => {}
                    // a server that forgot us has forgotten the peer too
                    Err(e) if e.is_unauthorized() => {}
                    Err(e) => return Err(server_failure(e)),
                }
            }
        }
        let groups: Vec<String> = leaving.iter().map(|a| a.attachment.group.clone()).collect();
        {
            let mut inner = lock(&self.inner);
            inner.state.attachments.retain(|a| !leaving.contains(a));
            if !inner.state.attachments.iter().any(|a| a.attachment.pane == pane) {
                inner.held.remove(pane);
                inner.agents.remove(pane);
                inner.delivery.remove(pane);
            } else if let Some(held) = inner.held.get_mut(pane) {
                held.retain(|(group, _)| !groups.contains(group));
            }
            for a in &leaving {
                let (server, group) = (&a.attachment.server, &a.attachment.group);
                let still_used = inner.state.attachments.iter().any(|o| o.attachment.server == *server && o.attachment.group == *group);
                if !still_used {
                    let key = upstream_key(server, group);
                    if let Some(handle) = inner.upstreams.remove(&key) {
                        handle.cancel.cancel();
                    }
                    inner.state.last_event_ids.remove(&key);
                }
            }
        }
        self.save_now().await;
        tracing::info!(%pane, ?groups, "detached");
        Ok(Reply::Detached { pane: pane.to_owned(), groups })
    }
}
