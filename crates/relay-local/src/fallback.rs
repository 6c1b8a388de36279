//! What the sidebar does when Claude Code will not let a message in through its inbox:
//! `relay attach --fallback` chooses it and passes it on to `relay-pane --fallback`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fallback {
    /// Report it (the sender sees held or failed) and type nothing.
    #[default]
    None,
    /// Announce it by keystrokes into the pane.
    Keys,
}

impl FromStr for Fallback {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "keys" => Ok(Self::Keys),
            other => Err(format!("unknown fallback {other:?}: none or keys")),
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Keys => "keys",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes() {
        for f in [Fallback::None, Fallback::Keys] {
            assert_eq!(f.to_string().parse::<Fallback>(), Ok(f));
        }
        assert!("type".parse::<Fallback>().unwrap_err().contains("none or keys"));
    }
}
