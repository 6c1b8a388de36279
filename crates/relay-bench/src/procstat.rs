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

/// Percent of one core used over `window`.
pub async fn cpu_percent(pid: u32, window: Duration) -> Option<f64> {
    let before = cpu_time(pid)?;
    tokio::time::sleep(window).await;
    let after = cpu_time(pid)?;
    Some((after - before).as_secs_f64() / window.as_secs_f64() * 100.0)
}
