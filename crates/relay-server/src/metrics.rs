//! Counters for `/metrics`, in the Prometheus text format. Plain atomics: every tool call
//! touches them, so they must cost next to nothing.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use relay_proto::MessageKind;

/// The tools whose calls are counted; anything else counts as "other".
pub const TOOLS: &[&str] =
    &["register", "send_message", "send_dm", "read_new_messages", "list_peers", "get_history", "leave_group", "other"];

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    calls: [AtomicU64; TOOLS.len()],
    errors: [AtomicU64; TOOLS.len()],
    latency: Histogram,
    broadcasts: AtomicU64,
    dms: AtomicU64,
    streams: AtomicI64,
    daemon_streams: AtomicI64,
    streams_dropped_slow: AtomicU64,
    replayed_from_store: AtomicU64,
    mcp_sessions: AtomicI64,
    live_bytes: AtomicI64,
    mcp_sessions_evicted: AtomicU64,
}

impl Metrics {
    pub fn tool_call(&self, tool: &str, elapsed: Duration, failed: bool) {
        let i = TOOLS.iter().position(|t| *t == tool).unwrap_or(TOOLS.len() - 1);
        self.calls[i].fetch_add(1, Relaxed);
        if failed {
            self.errors[i].fetch_add(1, Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        if let Some(b) = BUCKETS.iter().position(|&le| secs <= le) {
            self.latency.buckets[b].fetch_add(1, Relaxed);
        }
        self.latency.count.fetch_add(1, Relaxed);
        self.latency.sum_micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    pub fn message(&self, kind: MessageKind) {
        match kind {
            MessageKind::Broadcast => &self.broadcasts,
            MessageKind::Dm => &self.dms,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn stream_opened(&self, daemon: bool) {
        self.gauge(daemon).fetch_add(1, Relaxed);
    }

    pub fn stream_closed(&self, daemon: bool) {
        self.gauge(daemon).fetch_sub(1, Relaxed);
    }

    fn gauge(&self, daemon: bool) -> &AtomicI64 {
        if daemon { &self.daemon_streams } else { &self.streams }
    }

    pub fn replayed_from_store(&self) {
        self.replayed_from_store.fetch_add(1, Relaxed);
    }

    pub fn stream_dropped_slow(&self) {
        self.streams_dropped_slow.fetch_add(1, Relaxed);
    }

    pub fn live_bytes(&self, bytes: usize) {
        self.live_bytes.store(bytes as i64, Relaxed);
    }

    pub fn sessions_open(&self, open: usize) {
        self.mcp_sessions.store(open as i64, Relaxed);
    }

    pub fn sessions_evicted(&self, n: usize) {
        self.mcp_sessions_evicted.fetch_add(n as u64, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "# HELP relay_tool_calls_total MCP tool calls by tool.")?;
        writeln!(out, "# TYPE relay_tool_calls_total counter")?;
        for (tool, n) in TOOLS.iter().zip(&self.calls) {
            writeln!(out, "relay_tool_calls_total{{tool=\"{tool}\"}} {}", n.load(Relaxed))?;
        }
        writeln!(out, "# HELP relay_tool_errors_total MCP tool calls that returned an error, by tool.")?;
        writeln!(out, "# TYPE relay_tool_errors_total counter")?;
        for (tool, n) in TOOLS.iter().zip(&self.errors) {
            writeln!(out, "relay_tool_errors_total{{tool=\"{tool}\"}} {}", n.load(Relaxed))?;
        }
        writeln!(out, "# HELP relay_tool_call_duration_seconds Time to answer an MCP tool call.")?;
        writeln!(out, "# TYPE relay_tool_call_duration_seconds histogram")?;
        let mut cumulative = 0;
        for (le, n) in BUCKETS.iter().zip(&self.latency.buckets) {
            cumulative += n.load(Relaxed);
            writeln!(out, "relay_tool_call_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}")?;
        }
        let count = self.latency.count.load(Relaxed);
        writeln!(out, "relay_tool_call_duration_seconds_bucket{{le=\"+Inf\"}} {count}")?;
        let sum = self.latency.sum_micros.load(Relaxed) as f64 / 1e6;
        writeln!(out, "relay_tool_call_duration_seconds_sum {sum}")?;
        writeln!(out, "relay_tool_call_duration_seconds_count {count}")?;
        writeln!(out, "# HELP relay_messages_total Messages stored, by kind.")?;
        writeln!(out, "# TYPE relay_messages_total counter")?;
        writeln!(out, "relay_messages_total{{kind=\"broadcast\"}} {}", self.broadcasts.load(Relaxed))?;
        writeln!(out, "relay_messages_total{{kind=\"dm\"}} {}", self.dms.load(Relaxed))?;
        writeln!(out, "# HELP relay_open_streams Event streams open now, per peer and per daemon (relayd) group stream.")?;
        writeln!(out, "# TYPE relay_open_streams gauge")?;
        writeln!(out, "relay_open_streams{{kind=\"peer\"}} {}", self.streams.load(Relaxed))?;
        writeln!(out, "relay_open_streams{{kind=\"daemon\"}} {}", self.daemon_streams.load(Relaxed))?;
        writeln!(out, "# HELP relay_streams_dropped_slow_total Streams closed because the client fell too far behind.")?;
        writeln!(out, "# TYPE relay_streams_dropped_slow_total counter")?;
        writeln!(out, "relay_streams_dropped_slow_total {}", self.streams_dropped_slow.load(Relaxed))?;
        writeln!(out, "# HELP relay_stream_store_reads_total Times a stream behind the live buffer read what it missed from the store.")?;
        writeln!(out, "# TYPE relay_stream_store_reads_total counter")?;
        writeln!(out, "relay_stream_store_reads_total {}", self.replayed_from_store.load(Relaxed))?;
        writeln!(out, "# HELP relay_live_buffer_bytes New messages kept in memory for the streams (at most live_buffer_bytes).")?;
        writeln!(out, "# TYPE relay_live_buffer_bytes gauge")?;
        writeln!(out, "relay_live_buffer_bytes {}", self.live_bytes.load(Relaxed))?;
        writeln!(out, "# HELP relay_mcp_sessions MCP sessions (protocol versions before 2026-07-28) open now.")?;
        writeln!(out, "# TYPE relay_mcp_sessions gauge")?;
        writeln!(out, "relay_mcp_sessions {}", self.mcp_sessions.load(Relaxed))?;
        writeln!(
            out,
            "# HELP relay_mcp_sessions_closed_for_room_total MCP sessions closed to keep within max_sessions, or unused too long."
        )?;
        writeln!(out, "# TYPE relay_mcp_sessions_closed_for_room_total counter")?;
        writeln!(out, "relay_mcp_sessions_closed_for_room_total {}", self.mcp_sessions_evicted.load(Relaxed))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.tool_call("send_message", Duration::from_micros(50), false);
        m.tool_call("send_message", Duration::from_millis(3), true);
        m.tool_call("mystery", Duration::from_secs(10), false);
        m.message(MessageKind::Dm);
        m.stream_opened(false);
        m.stream_opened(true);
        m.stream_opened(true);
        m.stream_closed(true);
        let text = m.render();
        for line in [
            "relay_tool_calls_total{tool=\"send_message\"} 2",
            "relay_tool_errors_total{tool=\"send_message\"} 1",
            "relay_tool_calls_total{tool=\"other\"} 1",
            "relay_tool_call_duration_seconds_bucket{le=\"0.0001\"} 1",
            "relay_tool_call_duration_seconds_bucket{le=\"0.005\"} 2",
            "relay_tool_call_duration_seconds_bucket{le=\"2.5\"} 2",
            "relay_tool_call_duration_seconds_bucket{le=\"+Inf\"} 3",
            "relay_messages_total{kind=\"dm\"} 1",
            "relay_open_streams{kind=\"peer\"} 1",
            "relay_open_streams{kind=\"daemon\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
