//! Resident memory and CPU time of a process, from /proc (Linux).

use std::time::Duration;

/// Resident set size in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Of the resident set, the bytes that are the process's own (heap, stacks) and those
/// mapped from files (its code, shared libraries).
pub fn rss_anon_and_file(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let kb: u64 = status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("RssAnon:")?, field("RssFile:")? + field("RssShmem:").unwrap_or(0)))
}

/// User plus system CPU time used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the parenthesised command name; utime and stime are the 14th and 15th
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second()))
}

fn clock_ticks_per_second() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux we run on
    100.0
}

/// CPU time that the server (when the bench started it) and the bench itself use from
/// `start` on: steadier than rates when the two share cores.
pub struct CpuMeter {
    server: Option<(u32, Duration)>,
    bench: Option<Duration>,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> Self {
        Self { server: server_pid.and_then(|pid| Some((pid, cpu_time(pid)?))), bench: cpu_time(std::process::id()) }
    }

    /// Microseconds of CPU since `start` per unit of work: the server's, the bench's.
    pub fn per(&self, units: usize) -> (Option<f64>, Option<f64>) {
        let us = |before: Duration, now: Option<Duration>| Some((now? - before).as_secs_f64() * 1e6 / units.max(1) as f64);
        let server = self.server.and_then(|(pid, before)| us(before, cpu_time(pid)));
        (server, self.bench.and_then(|before| us(before, cpu_time(std::process::id()))))
    }
}

/// Percent of one core used over `window`.
pub async fn cpu_percent(pid: u32, window: Duration) -> Option<f64> {
    let before = cpu_time(pid)?;
    tokio::time::sleep(window).await;
    let after = cpu_time(pid)?;
    Some((after - before).as_secs_f64() / window.as_secs_f64() * 100.0)
}
