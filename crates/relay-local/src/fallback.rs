//! What the sidebar does when Claude Code will not let a message in through its inbox:
//! `relay attach --fallback` chooses it and passes it on to `relay-pane --fallback`.

use std::fmt;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Fallback {
    /// Report it (the sender sees held or failed) and type nothing.
    #[default]
    None,
    /// Announce it by keystrokes into the pane.
    Keys,
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
        use clap::ValueEnum;
        for f in Fallback::value_variants() {
            assert_eq!(Fallback::from_str(&f.to_string(), false), Ok(*f), "the sidebar reads what relay attach writes");
        }
        assert!(Fallback::from_str("type", false).is_err());
    }
}
