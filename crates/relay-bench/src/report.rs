//! The figures: a table on stdout and a JSON file.

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub name: &'static str,
    pub value: f64,
    pub unit: &'static str,
    /// The goal, as text ("≥ 20000").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<&'static str>,
    /// Whether `value` meets `target`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meets_target: Option<bool>,
    /// What the original Python relay measured on the same kind of machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original: Option<&'static str>,
}

#[derive(Default, Serialize)]
pub struct Report {
    pub figures: Vec<Figure>,
    /// Scenarios that ran to the end with nothing lost.
    pub completed: Vec<&'static str>,
    pub failures: Vec<String>,
}

pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Report {
    pub fn add(&mut self, scenario: &'static str, name: &'static str, value: f64, unit: &'static str) {
        self.push(scenario, name, value, unit, None, None);
    }

    pub fn goal(
        &mut self,
        scenario: &'static str,
        name: &'static str,
        value: f64,
        unit: &'static str,
        goal: (Goal, &'static str),
        original: Option<&'static str>,
    ) {
        self.push(scenario, name, value, unit, Some(goal), original);
    }

    fn push(
        &mut self,
        scenario: &'static str,
        name: &'static str,
        value: f64,
        unit: &'static str,
        goal: Option<(Goal, &'static str)>,
        original: Option<&'static str>,
    ) {
        let meets_target = goal.as_ref().map(|(g, _)| match g {
            Goal::AtLeast(t) => value >= *t,
            Goal::AtMost(t) => value <= *t,
        });
        let target = goal.map(|(_, text)| text);
        self.figures.push(Figure { scenario, name, value, unit, target, meets_target, original });
    }

    pub fn print_table(&self) {
        let width = self.figures.iter().map(|f| f.scenario.chars().count()).max().unwrap_or(0).max(12);
        println!("{:<width$} {:<34} {:>14} {:<9} {:<12} {:<6} original", "scenario", "figure", "value", "unit", "target", "met");
        for f in &self.figures {
            let met = match f.meets_target {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            println!(
                "{:<width$} {:<34} {:>14} {:<9} {:<12} {:<6} {}",
                f.scenario,
                f.name,
                format_value(f.value),
                f.unit,
                f.target.unwrap_or(""),
                met,
                f.original.unwrap_or("")
            );
        }
        for failure in &self.failures {
            println!("FAILED: {failure}");
        }
    }

    pub fn write_json(&self, path: &Path, command: &[String], quick: bool) -> anyhow::Result<()> {
        let doc = serde_json::json!({
            "tool": "relay-bench",
            "version": env!("CARGO_PKG_VERSION"),
            "time": chrono::Utc::now().to_rfc3339(),
            "command": command,
            "quick": quick,
            "machine": {
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "os": std::env::consts::OS,
                "arch": std::env::consts::ARCH,
                "cpu": cpu_model(),
            },
            "figures": self.figures,
            "completed": self.completed,
            "failures": self.failures,
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        relay_util::write_atomically(path, serde_json::to_string_pretty(&doc)?.as_bytes(), 0o644)?;
        Ok(())
    }
}

fn format_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_owned()))
        .unwrap_or_default()
}

/// The value at quantile `q` (0..=1) of unsorted samples.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}
