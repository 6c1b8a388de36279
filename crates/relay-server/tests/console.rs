//! The console over real HTTP: sign-in links, sessions, the Origin and CSRF checks, what a
//! human sees of a group, and hostile text kept as text.

mod support;

use futures::StreamExt;
use serde_json::{Value, json};
use support::*;

fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

struct Daemon {
    token: String,
}

impl Daemon {
    async fn new(server: &TestServer) -> Self {
        let body: Value =
            http().post(server.url("/v1/daemons")).json(&json!({"hostname": "box"})).send().await.unwrap().json().await.unwrap();
        Daemon { token: body["token"].as_str().unwrap().to_owned() }
    }

    /// Registers an agent through this daemon; its peer id.
    async fn agent(&self, server: &TestServer, group: &str, name: &str) -> String {
        let resp = http()
            .post(server.url("/v1/peers"))
            .bearer_auth(&self.token)
            .json(&json!({"group_id": group, "hostname": "box", "working_directory": format!("/{name}"), "name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()["peer_id"].as_str().unwrap().to_owned()
    }

    async fn console(&self, server: &TestServer, what: &str, body: Value) -> (u16, Value) {
        let resp = http().post(server.url(&format!("/v1/console/{what}"))).bearer_auth(&self.token).json(&body).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// A sign-in link's path.
    async fn link(&self, server: &TestServer, name: &str) -> String {
        let (status, body) = self.console(server, "sign-in", json!({"name": name})).await;
        assert_eq!(status, 201, "{body}");
        body["path"].as_str().unwrap().to_owned()
    }

    async fn send_as(&self, server: &TestServer, peer: &str, text: &str, to: Option<&str>) -> Value {
        let resp = http()
            .post(server.url(&format!("/v1/peers/{peer}/messages")))
            .bearer_auth(&self.token)
            .json(&json!({"message": text, "to": to}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }
}

/// A signed-in browser: its cookie, and the server's address as its Origin.
struct Browser {
    cookie: String,
    origin: String,
}

impl Browser {
    async fn sign_in(server: &TestServer, path: &str) -> Self {
        let origin = format!("http://{}", server.addr);
        // opening the link uses nothing up; its page's button does
        let page = http().get(server.url(path)).send().await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains("<button id=\"sign-in\" type=\"submit\">Sign in</button>"));
        let resp = http().post(server.url(path)).header("origin", &origin).send().await.unwrap();
        assert_eq!(resp.status(), 303, "a working link signs in and goes to the console");
        let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        for part in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
            assert!(set.contains(part), "{set}");
        }
        let cookie = set.split(';').next().unwrap().to_owned();
        Browser { cookie, origin }
    }

    async fn get(&self, server: &TestServer, path: &str) -> reqwest::Response {
        http().get(server.url(path)).header("cookie", &self.cookie).send().await.unwrap()
    }

    async fn page(&self, server: &TestServer, path: &str) -> String {
        let resp = self.get(server, path).await;
        assert_eq!(resp.status(), 200, "{path}");
        resp.text().await.unwrap()
    }

    async fn post(&self, server: &TestServer, path: &str, form: &[(&str, &str)], origin: Option<&str>) -> reqwest::Response {
        let mut request = http().post(server.url(path)).header("cookie", &self.cookie).form(form);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send().await.unwrap()
    }

    /// The CSRF token of a page's forms.
    async fn csrf(&self, server: &TestServer, group: &str) -> String {
        let page = self.page(server, &format!("/console/g/{group}")).await;
        let at = page.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
        page[at..].split('"').next().unwrap().to_owned()
    }
}

#[tokio::test]
async fn a_sign_in_link_works_once_and_its_session_only_on_its_server() {
    let (server, other) = (TestServer::start().await, TestServer::start().await);
    let daemon = Daemon::new(&server).await;
    daemon.agent(&server, "team", "api").await;
    let path = daemon.link(&server, "ann").await;
    assert!(path.starts_with("/console/sign-in/"), "{path}");

    let browser = Browser::sign_in(&server, &path).await;
    let again = http().get(server.url(&path)).send().await.unwrap();
    assert_eq!(again.status(), 403, "a link works once");
    assert!(again.text().await.unwrap().contains("used already or has expired"));
    let origin = format!("http://{}", server.addr);
    let twice = http().post(server.url(&path)).header("origin", &origin).send().await.unwrap();
    assert_eq!(twice.status(), 403);
    // another site's page cannot sign a browser in with a link of its own
    let (planted, other_site) = (daemon.link(&server, "ann").await, "http://evil.example");
    let forced = http().post(server.url(&planted)).header("origin", other_site).send().await.unwrap();
    assert_eq!(forced.status(), 403);
    assert!(forced.headers().get("set-cookie").is_none());

    // the only group: straight to it
    let home = browser.get(&server, "/console").await;
    assert_eq!((home.status().as_u16(), home.headers()["location"].to_str().unwrap()), (303, "/console/g/team"));
    let page = browser.page(&server, "/console/g/team").await;
    assert!(page.contains("signed in as <bdi>ann</bdi>"), "{page}");

    // the same cookie means nothing to another server
    let elsewhere = browser.get(&other, "/console/g/team").await;
    assert_eq!(elsewhere.status(), 401);
    let nobody = http().get(server.url("/console")).send().await.unwrap();
    assert_eq!(nobody.status(), 401);
    assert!(nobody.text().await.unwrap().contains("relay console"), "says how to sign in");

    // a group none of ann's agents is in is not hers
    let not_hers = browser.get(&server, "/console/g/elsewhere").await;
    assert_eq!(not_hers.status(), 404);
}

#[tokio::test]
async fn requests_from_other_sites_and_forms_without_the_token_are_refused() {
    let server = TestServer::start().await;
    let daemon = Daemon::new(&server).await;
    daemon.agent(&server, "team", "api").await;
    let browser = Browser::sign_in(&server, &daemon.link(&server, "ann").await).await;
    let csrf = browser.csrf(&server, "team").await;
    let own = browser.origin.clone();
    let send = |text: &'static str, csrf: String| [("csrf", csrf), ("text", text.to_owned()), ("to", String::new())];

    let foreign = browser.post(&server, "/console/g/team/send", &as_refs(&send("evil", csrf.clone())), Some("http://evil.example")).await;
    assert_eq!(foreign.status(), 403);
    let unsaid = browser.post(&server, "/console/g/team/send", &as_refs(&send("no origin", csrf.clone())), None).await;
    assert_eq!(unsaid.status(), 403);
    let forged = browser.post(&server, "/console/g/team/send", &as_refs(&send("forged", "nope".into())), Some(&own)).await;
    assert_eq!(forged.status(), 403);
    let cross_site_read = http()
        .get(server.url("/console/g/team"))
        .header("cookie", &browser.cookie)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site_read.status(), 403);
    assert!(cross_site_read.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));

    let sent = browser.post(&server, "/console/g/team/send", &as_refs(&send("hello agents", csrf)), Some(&own)).await;
    assert_eq!(sent.status(), 303);
    let page = browser.page(&server, "/console/g/team").await;
    assert!(page.contains("hello agents"));
    for refused in ["evil", "no origin", "forged"] {
        assert!(!page.contains(&format!(">{refused}<")), "{refused} was not sent");
    }
}

fn as_refs<'a>(form: &'a [(&'static str, String); 3]) -> Vec<(&'static str, &'a str)> {
    form.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Reads a console stream until `want` shows up in it (or the wait runs out): what came.
async fn stream_until(resp: reqwest::Response, want: &str) -> String {
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + LONG;
    while !seen.contains(want) {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    seen
}

#[tokio::test]
async fn a_human_sees_broadcasts_their_own_and_their_agents_dms_never_others() {
    let server = TestServer::start().await;
    let (ann_daemon, bob_daemon) = (Daemon::new(&server).await, Daemon::new(&server).await);
    let a1 = ann_daemon.agent(&server, "team", "a1").await;
    let a2 = ann_daemon.agent(&server, "team", "a2").await;
    let b1 = bob_daemon.agent(&server, "team", "b1").await;
    let b2 = bob_daemon.agent(&server, "team", "b2").await;
    let ann = Browser::sign_in(&server, &ann_daemon.link(&server, "ann").await).await;
    // bob is a human too, with a console of his own
    let bob = Browser::sign_in(&server, &bob_daemon.link(&server, "bob").await).await;
    bob.page(&server, "/console/g/team").await;

    bob_daemon.send_as(&server, &b1, "broadcast from b1", None).await;
    ann_daemon.send_as(&server, &a1, "a1 to a2, between agents of ann", Some(&a2)).await;
    bob_daemon.send_as(&server, &b1, "b1 to b2, the business of bob", Some(&b2)).await;
    bob_daemon.send_as(&server, &b1, "b1 to a1, to an agent of ann", Some(&a1)).await;

    let page = ann.page(&server, "/console/g/team").await;
    for seen in ["broadcast from b1", "a1 to a2, between agents of ann", "b1 to a1, to an agent of ann"] {
        assert!(page.contains(seen), "{seen} missing from\n{page}");
    }
    assert!(!page.contains("the business of bob"), "another human's agents' DM showed");

    // live: the same rules on the stream
    let head: u64 = page.split("data-head=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    let stream = ann.get(&server, &format!("/console/g/team/events?after={head}")).await;
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    bob_daemon.send_as(&server, &b2, "live: b2 to b1, still of bob", Some(&b1)).await;
    bob_daemon.send_as(&server, &b2, "live: b2 to a2", Some(&a2)).await;
    bob_daemon.send_as(&server, &b2, "live: the end", None).await;
    let seen = stream_until(stream, "live: the end").await;
    assert!(seen.contains("live: b2 to a2") && seen.contains("live: the end"), "{seen}");
    assert!(!seen.contains("still of bob"), "{seen}");

    // the human is a member of kind human, and agents see them so
    let peers = ann.page(&server, "/console/g/team/peers").await;
    assert!(peers.contains("<span class=\"badge\">human</span>"), "{peers}");
    let resp = http().get(server.url(&format!("/v1/peers/{b1}/peers"))).bearer_auth(&bob_daemon.token).send().await.unwrap();
    let listed: Value = resp.json().await.unwrap();
    let kinds: Vec<(String, String)> = listed["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["display_name"].as_str().unwrap().to_owned(), p["kind"].as_str().unwrap().to_owned()))
        .collect();
    assert!(kinds.contains(&("ann".into(), "human".into())) && kinds.contains(&("bob".into(), "human".into())), "{kinds:?}");
    assert!(kinds.contains(&("a1".into(), "agent".into())), "{kinds:?}");
}

#[tokio::test]
async fn a_humans_dm_reaches_the_agent_as_from_a_human_and_its_marks_come_back() {
    let server = TestServer::start().await;
    let daemon = Daemon::new(&server).await;
    let a1 = daemon.agent(&server, "team", "a1").await;
    let ann = Browser::sign_in(&server, &daemon.link(&server, "ann").await).await;
    let csrf = ann.csrf(&server, "team").await;
    let mut agent_stream = EventStream::open(&server.url("/v1/groups/team/events"), Some(&daemon.token), None).await;

    let resp = http()
        .post(server.url("/console/g/team/send"))
        .header("cookie", &ann.cookie)
        .header("origin", &ann.origin)
        .header("accept", "application/json")
        .form(&[("csrf", csrf.as_str()), ("text", "please rebase"), ("to", a1.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent: Value = resp.json().await.unwrap();
    let message_id = sent["message_id"].as_str().unwrap().to_owned();

    let dm = loop {
        let event = agent_stream.next(LONG).await.expect("the DM reaches the agent's daemon");
        if event.event.as_deref() == Some("dm") {
            break event;
        }
    };
    assert_eq!((dm.data["text"].as_str(), dm.data["sender_kind"].as_str()), (Some("please rebase"), Some("human")));
    assert_eq!(dm.data["sender"]["name"], "ann");

    // the agent reads it: the mark on ann's page says so
    let stream = ann.get(&server, "/console/g/team/events").await;
    let receipt = json!({"receipts": [{"peer_id": a1, "message_id": message_id, "state": "read"}]});
    let resp = http().post(server.url("/v1/receipts")).bearer_auth(&daemon.token).json(&receipt).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = stream_until(stream, "st-read").await;
    assert!(seen.contains("event: receipt") && seen.contains(&format!("data-for=\"{message_id}\"")), "{seen}");
    let page = ann.page(&server, "/console/g/team").await;
    assert!(page.contains("class=\"mark st-read\""), "the page shows the mark too");
}

#[tokio::test]
async fn hostile_text_is_shown_as_text() {
    let server = TestServer::start().await;
    let daemon = Daemon::new(&server).await;
    let a1 = daemon.agent(&server, "team", "a1").await;
    let ann = Browser::sign_in(&server, &daemon.link(&server, "ann").await).await;
    let hostile = "<script>alert(1)</script> <img src=x onerror=alert(2)> </div></li> \u{1b}[31mred\u{1b}[0m \u{202E}desrever";
    daemon.send_as(&server, &a1, hostile, None).await;
    let long = "line\n".repeat(400);
    daemon.send_as(&server, &a1, &long, None).await;

    let resp = ann.get(&server, "/console/g/team").await;
    let csp = resp.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    let page = resp.text().await.unwrap();
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{page}");
    assert!(page.contains("&lt;img src=x onerror=alert(2)&gt;") && page.contains("&lt;/div&gt;&lt;/li&gt;"));
    assert!(page.contains("␛[31mred␛[0m") && page.contains("⟨U+202E⟩desrever"), "controls shown, not obeyed");
    assert!(!page.contains("<script>alert") && !page.contains('\u{1b}') && !page.contains('\u{202E}'));
    // the only script is the console's own file
    assert_eq!(page.matches("<script").count(), 1);
    assert!(page.contains("<details><summary>show all (2000 characters)</summary>"), "long texts fold");

    let js = ann.get(&server, &format!("/console/assets/{}/console.js", env!("CARGO_PKG_VERSION"))).await;
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");
    assert!(js.text().await.unwrap().contains("EventSource"));
}

#[tokio::test]
async fn signing_out_everywhere_ends_every_session_and_pairing_joins_another_machine() {
    let server = TestServer::start().await;
    let (laptop, cloud) = (Daemon::new(&server).await, Daemon::new(&server).await);
    let a1 = laptop.agent(&server, "team", "a1").await;
    let c1 = cloud.agent(&server, "team", "c1").await;
    let c2 = cloud.agent(&server, "team", "c2").await;
    let first = Browser::sign_in(&server, &laptop.link(&server, "ann").await).await;
    let second = Browser::sign_in(&server, &laptop.link(&server, "ann").await).await;

    // the cloud box's relayd joins ann with a code from the laptop's
    let (status, pairing) = laptop.console(&server, "pairings", json!({})).await;
    assert_eq!(status, 201);
    let code = pairing["code"].as_str().unwrap();
    let (status, joined) = cloud.console(&server, "join", json!({"code": code})).await;
    assert_eq!((status, joined["human"].as_str()), (200, Some("ann")));
    let (status, reused) = laptop.console(&server, "join", json!({"code": code})).await;
    assert_eq!(status, 400, "a code works once: {reused}");
    cloud.send_as(&server, &c1, "c1 to c2 on the cloud box", Some(&c2)).await;
    laptop.send_as(&server, &a1, "a1 to c1", Some(&c1)).await;
    let page = second.page(&server, "/console/g/team").await;
    assert!(page.contains("c1 to c2 on the cloud box") && page.contains("a1 to c1"), "{page}");

    let unused = laptop.link(&server, "ann").await;
    let open_stream = second.get(&server, "/console/g/team/events").await;
    let (status, out) = cloud.console(&server, "sign-out-everywhere", json!({})).await;
    assert_eq!((status, out["human"].as_str()), (200, Some("ann")));
    for browser in [&first, &second] {
        assert_eq!(browser.get(&server, "/console/g/team").await.status(), 401);
    }
    assert_eq!(http().get(server.url(&unused)).send().await.unwrap().status(), 403, "links from before end too");
    // a stream opened before ends rather than carry on
    laptop.send_as(&server, &a1, "after signing out", None).await;
    let seen = stream_until(open_stream, "after signing out").await;
    assert!(!seen.contains("after signing out"), "{seen}");
    // and a new link signs in again
    let again = Browser::sign_in(&server, &laptop.link(&server, "ann").await).await;
    assert_eq!(again.get(&server, "/console/g/team").await.status(), 200);
}

#[tokio::test]
async fn the_peers_panel_says_what_online_agents_are_doing() {
    let server = TestServer::start().await;
    let daemon = Daemon::new(&server).await;
    let a1 = daemon.agent(&server, "team", "a1").await;
    let ann = Browser::sign_in(&server, &daemon.link(&server, "ann").await).await;
    let activity = |what: &'static str| {
        let url = server.url(&format!("/v1/peers/{a1}/activity"));
        let token = daemon.token.clone();
        async move { http().post(url).bearer_auth(token).json(&json!({"activity": what})).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(activity("busy").await, 200);
    assert_eq!(activity("dancing").await, 400);
    let panel = ann.page(&server, "/console/g/team/peers").await;
    assert!(!panel.contains("activity busy"), "an offline agent is doing nothing: {panel}");

    // online (its daemon's stream is open): its activity shows
    let _stream = EventStream::open(&server.url("/v1/groups/team/events"), Some(&daemon.token), None).await;
    let panel = ann.page(&server, "/console/g/team/peers").await;
    assert!(panel.contains("<span class=\"activity busy\">busy</span>"), "{panel}");
    assert_eq!(activity("idle").await, 200);
    assert!(ann.page(&server, "/console/g/team/peers").await.contains("<span class=\"activity idle\">idle</span>"));
}

#[tokio::test]
async fn the_timeline_filters_scrolls_back_and_a_human_can_leave() {
    let server = TestServer::start().await;
    let daemon = Daemon::new(&server).await;
    let a1 = daemon.agent(&server, "team", "a1").await;
    let a2 = daemon.agent(&server, "team", "a2").await;
    for i in 0..120 {
        let (from, text) = if i % 2 == 0 { (&a1, format!("even {i:03} from a1")) } else { (&a2, format!("odd {i:03} from a2")) };
        daemon.send_as(&server, from, &text, None).await;
    }
    // the last hour, per sender
    let ann_early = Browser::sign_in(&server, &daemon.link(&server, "ann").await).await;
    let activity = ann_early.page(&server, "/console/g/team/activity").await;
    assert!(activity.contains("60 a1") && activity.contains("60 a2"), "{activity}");
    // a link opened behind a TLS proxy sets a Secure cookie
    let path = daemon.link(&server, "ann").await;
    let behind_tls = http()
        .post(server.url(&path))
        .header("origin", format!("http://{}", server.addr))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let set = behind_tls.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("__Host-relay_console=") && set.contains("; Secure") && set.contains("Path=/;"), "{set}");
    let ann = Browser::sign_in(&server, &daemon.link(&server, "ann").await).await;

    // the newest page, and a link to older ones
    let page = ann.page(&server, "/console/g/team").await;
    assert!(page.contains("odd 119 from a2") && !page.contains("even 000 from a1"), "the newest 100");
    let older =
        page.split("class=\"older\" href=\"").nth(1).expect("a link to older messages").split('"').next().unwrap().replace("&amp;", "&");
    let before = ann.page(&server, &older).await;
    assert!(before.contains("even 000 from a1") && !before.contains("odd 119 from a2"), "{older}");

    // text (a regex), sender and time filters, as get_history has them
    let filtered = ann.page(&server, "/console/g/team?q=%5Eeven%201%5B01%5D&sender=a1").await;
    assert_eq!(filtered.matches(" from a1</div>").count(), 10, "even 100..118 from a1");
    assert!(!filtered.contains("odd ") && !filtered.contains("joined"), "filters leave out the rest");
    let bad = ann.page(&server, "/console/g/team?q=%5B").await;
    assert!(bad.contains("class=\"error\"") && bad.contains("filter"), "a broken regex says so");
    let future = ann.page(&server, "/console/g/team?since=2999-01-01").await;
    assert!(!future.contains("from a1"));

    // leaving: the group is gone from the console, the agents see the human leave
    let csrf = ann.csrf(&server, "team").await;
    let left = ann.post(&server, "/console/g/team/leave", &[("csrf", csrf.as_str())], Some(&ann.origin)).await;
    assert_eq!((left.status().as_u16(), left.headers()["location"].to_str().unwrap()), (303, "/console"));
    let home = ann.page(&server, "/console").await;
    assert!(home.contains("Your groups") && !home.contains("/console/g/team"), "{home}");
    assert_eq!(ann.get(&server, "/console/g/team").await.status(), 404);
}
