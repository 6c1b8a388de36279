//! Input rules shared by the server, the daemon and the CLI.

use thiserror::Error;

/// Default upper bound of one message body, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const MAX_GROUP_ID_CHARS: usize = 64;
pub const MAX_NAME_CHARS: usize = 64;
pub const MAX_HOSTNAME_CHARS: usize = 253;
pub const MAX_PATH_CHARS: usize = 4096;
pub const MAX_BRANCH_CHARS: usize = 255;
pub const MIN_JOIN_KEY_CHARS: usize = 8;
pub const MAX_JOIN_KEY_CHARS: usize = 256;
/// Length of an event preview, in characters.
pub const PREVIEW_CHARS: usize = 160;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is too long: {len} {unit}, the limit is {max}")]
    TooLong { field: &'static str, len: usize, max: usize, unit: &'static str },
    #[error("{field} is too short: at least {min} characters are needed")]
    TooShort { field: &'static str, min: usize },
    #[error("{field} {value:?} contains {what}; {rule}")]
    BadChars { field: &'static str, value: String, what: String, rule: &'static str },
}

const GROUP_RULE: &str = "use letters, digits, '.', '_' and '-', starting with a letter or digit (at most 64)";
const NAME_RULE: &str = "use letters, digits and . _ - : @ / + (no spaces, at most 64)";

/// Group ids: ASCII letters, digits, `.`, `_`, `-`; starting with a letter or digit.
pub fn group_id(value: &str) -> Result<(), ValidationError> {
    let field = "group_id";
    non_empty(field, value)?;
    max_chars(field, value, MAX_GROUP_ID_CHARS)?;
    if let Some(bad) = value.chars().enumerate().find(|&(i, c)| !(c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '.' | '_' | '-')))) {
        return Err(bad_char(field, value, bad.1, GROUP_RULE));
    }
    Ok(())
}

/// Display names: what `send_dm` matches and what panes show.
pub fn display_name(value: &str) -> Result<(), ValidationError> {
    let field = "name";
    non_empty(field, value)?;
    max_chars(field, value, MAX_NAME_CHARS)?;
    if let Some(bad) = value.chars().find(|&c| !name_char(c)) {
        return Err(bad_char(field, value, bad, NAME_RULE));
    }
    let has = |script: fn(char) -> bool| value.chars().any(script);
    if has(latin) && (has(cyrillic) || has(greek)) {
        let what = "Latin letters mixed with Cyrillic or Greek ones, which can imitate another name".to_owned();
        return Err(ValidationError::BadChars { field, value: value.chars().take(80).collect(), what, rule: NAME_RULE });
    }
    Ok(())
}

fn latin(c: char) -> bool {
    c.is_ascii_alphabetic() || ('\u{c0}'..='\u{24f}').contains(&c) || ('\u{ff21}'..='\u{ff5a}').contains(&c)
}

fn cyrillic(c: char) -> bool {
    ('\u{400}'..='\u{52f}').contains(&c)
}

fn greek(c: char) -> bool {
    ('\u{370}'..='\u{3ff}').contains(&c) || ('\u{1f00}'..='\u{1fff}').contains(&c)
}

/// A name as it looks: lower case, with Cyrillic and Greek letters that look like Latin ones
/// (and full-width Latin) read as those. Two names with one skeleton are one name to a reader.
pub fn skeleton(name: &str) -> String {
    const LOOKALIKES: &[(char, char)] = &[
        // capitals first: lower-cased, some would read as another letter (Η → η)
        ('А', 'a'),
        ('В', 'b'),
        ('Е', 'e'),
        ('К', 'k'),
        ('М', 'm'),
        ('Н', 'h'),
        ('О', 'o'),
        ('Р', 'p'),
        ('С', 'c'),
        ('Т', 't'),
        ('У', 'y'),
        ('Х', 'x'),
        ('І', 'i'),
        ('Ј', 'j'),
        ('Ѕ', 's'),
        ('Α', 'a'),
        ('Β', 'b'),
        ('Ε', 'e'),
        ('Ζ', 'z'),
        ('Η', 'h'),
        ('Ι', 'i'),
        ('Κ', 'k'),
        ('Μ', 'm'),
        ('Ν', 'n'),
        ('Ο', 'o'),
        ('Ρ', 'p'),
        ('Τ', 't'),
        ('Υ', 'y'),
        ('Χ', 'x'),
        ('а', 'a'),
        ('в', 'b'),
        ('е', 'e'),
        ('к', 'k'),
        ('м', 'm'),
        ('н', 'h'),
        ('о', 'o'),
        ('р', 'p'),
        ('с', 'c'),
        ('т', 't'),
        ('у', 'y'),
        ('х', 'x'),
        ('і', 'i'),
        ('ј', 'j'),
        ('ѕ', 's'),
        ('ԁ', 'd'),
        ('һ', 'h'),
        ('ԛ', 'q'),
        ('ԝ', 'w'),
        ('ӏ', 'l'),
        ('α', 'a'),
        ('β', 'b'),
        ('ε', 'e'),
        ('ζ', 'z'),
        ('η', 'n'),
        ('ι', 'i'),
        ('κ', 'k'),
        ('μ', 'm'),
        ('ν', 'v'),
        ('ο', 'o'),
        ('ρ', 'p'),
        ('τ', 't'),
        ('υ', 'u'),
        ('χ', 'x'),
    ];
    let lookalike = |c: char| LOOKALIKES.iter().find(|(from, _)| *from == c).map(|(_, to)| *to);
    name.chars()
        .flat_map(|c| match lookalike(c) {
            Some(latin) => vec![latin],
            None => c.to_lowercase().collect(),
        })
        .map(|c| match c {
            '\u{ff41}'..='\u{ff5a}' => char::from_u32(c as u32 - 0xff41 + 'a' as u32).unwrap_or(c),
            c => lookalike(c).unwrap_or(c),
        })
        .collect()
}

fn name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '/' | '+')
}

/// Turns arbitrary text (a hostname, a directory name) into a valid display-name part.
pub fn sanitize_name_part(value: &str) -> String {
    let cleaned: String = value.chars().map(|c| if name_char(c) { c } else { '-' }).take(MAX_NAME_CHARS).collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() { "peer".to_owned() } else { trimmed.to_owned() }
}

/// Free text that must be a single printable line (hostnames, paths, branches).
pub fn single_line(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    non_empty(field, value)?;
    max_chars(field, value, max)?;
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(bad_char(field, value, c, "control characters are not allowed"));
    }
    Ok(())
}

pub fn hostname(value: &str) -> Result<(), ValidationError> {
    single_line("hostname", value, MAX_HOSTNAME_CHARS)
}

pub fn working_directory(value: &str) -> Result<(), ValidationError> {
    single_line("working_directory", value, MAX_PATH_CHARS)
}

pub fn git_branch(value: &str) -> Result<(), ValidationError> {
    single_line("git_branch", value, MAX_BRANCH_CHARS)
}

pub fn join_key(value: &str) -> Result<(), ValidationError> {
    let field = "join_key";
    non_empty(field, value)?;
    let len = value.chars().count();
    if len < MIN_JOIN_KEY_CHARS {
        return Err(ValidationError::TooShort { field, min: MIN_JOIN_KEY_CHARS });
    }
    max_chars(field, value, MAX_JOIN_KEY_CHARS)
}

/// A message body: not blank, at most `max_bytes` bytes of UTF-8, no NUL.
pub fn message(value: &str, max_bytes: usize) -> Result<(), ValidationError> {
    let field = "message";
    if value.trim().is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if value.len() > max_bytes {
        return Err(ValidationError::TooLong { field, len: value.len(), max: max_bytes, unit: "bytes" });
    }
    if value.contains('\0') {
        return Err(bad_char(field, "", '\0', "NUL bytes are not allowed"));
    }
    Ok(())
}

/// A short single-line excerpt of a message for notifications.
pub fn preview(text: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    let mut last_space = false;
    for c in text.trim().chars() {
        let c = if c.is_whitespace() || c.is_control() { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        if chars == PREVIEW_CHARS {
            out.truncate(out.trim_end().len());
            out.push('…');
            return out;
        }
        out.push(c);
        chars += 1;
    }
    out
}

fn non_empty(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() { Err(ValidationError::Empty { field }) } else { Ok(()) }
}

fn max_chars(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    let len = value.chars().count();
    if len > max {
        return Err(ValidationError::TooLong { field, len, max, unit: "characters" });
    }
    Ok(())
}

fn bad_char(field: &'static str, value: &str, c: char, rule: &'static str) -> ValidationError {
    let shown: String = value.chars().take(80).collect();
    ValidationError::BadChars { field, value: shown, what: format!("{c:?}"), rule }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids() {
        for ok in ["g", "my-group", "Team_1.dev", "0abc"] {
            assert_eq!(group_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-lead", "has space", "slash/no", "é", &"x".repeat(65)] {
            assert!(group_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn display_names() {
        for ok in ["alice", "host:proj", "bob@web", "ünï:cödé", "a/b+c"] {
            assert_eq!(display_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "two words", "tab\there", "esc\u{1b}[31m", &"n".repeat(65), "evil\u{202e}gnp", "zero\u{200b}width"] {
            assert!(display_name(bad).is_err(), "{bad:?} accepted");
        }
        // a Cyrillic "а" among Latin letters imitates a name; a name in one script is fine
        assert!(display_name("\u{430}lice").unwrap_err().to_string().contains("imitate"));
        assert_eq!(display_name("борис"), Ok(()));
        assert_eq!(display_name("σοφία"), Ok(()));
    }

    #[test]
    fn lookalike_names_share_a_skeleton() {
        assert_eq!(skeleton("Alice"), skeleton("alice"));
        assert_eq!(skeleton("\u{430}\u{3bf}"), "ao", "Cyrillic a, Greek o");
        assert_eq!(skeleton("\u{ff41}lice"), "alice", "full-width a");
        assert_eq!(skeleton("рорра"), "poppa");
        assert_ne!(skeleton("bob"), skeleton("rob"));
        assert_eq!(skeleton("\u{39d}\u{395}\u{39f}"), skeleton("NEO"), "Greek capitals");
        assert_eq!(skeleton("\u{397}\u{3a5}"), "hy");
    }

    #[test]
    fn sanitized_parts_are_valid_names() {
        assert_eq!(sanitize_name_part("my project (copy)"), "my-project--copy");
        assert_eq!(sanitize_name_part("   "), "peer");
        assert_eq!(sanitize_name_part("\u{1b}[2J"), "2J");
        for raw in ["x y", "\n\n", "ok", &"z".repeat(300)] {
            assert_eq!(display_name(&sanitize_name_part(raw)), Ok(()));
        }
    }

    #[test]
    fn messages() {
        assert!(message("hi", 10).is_ok());
        assert_eq!(message("  \n", 10), Err(ValidationError::Empty { field: "message" }));
        assert!(matches!(message("0123456789A", 10), Err(ValidationError::TooLong { len: 11, .. })));
        assert!(message("a\0b", 10).is_err());
        // the limit counts bytes, not characters
        assert!(message("éééééé", 10).is_err());
    }

    #[test]
    fn free_text_rejects_control_characters() {
        assert!(hostname("box-1.local").is_ok());
        assert!(working_directory("/home/me/my project").is_ok());
        assert!(working_directory("/tmp/\u{7}bell").is_err());
        assert!(git_branch("feature/x").is_ok());
        assert!(git_branch("a\nb").is_err());
    }

    #[test]
    fn join_keys() {
        assert!(join_key("correct horse").is_ok());
        assert_eq!(join_key("short"), Err(ValidationError::TooShort { field: "join_key", min: 8 }));
    }

    #[test]
    fn previews_are_single_line_and_bounded() {
        assert_eq!(preview("  hello\n\n  world\t!  "), "hello world !");
        let long = "word ".repeat(100);
        let p = preview(&long);
        assert!(p.chars().count() <= PREVIEW_CHARS + 1);
        assert!(p.ends_with('…'));
        assert_eq!(preview("ок\u{1b}[31m"), "ок [31m");
    }

    #[test]
    fn errors_read_well() {
        let e = group_id("bad group").unwrap_err().to_string();
        assert!(e.contains("group_id \"bad group\" contains ' '"), "{e}");
        let e = message(&"x".repeat(70_000), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err().to_string();
        assert_eq!(e, "message is too long: 70000 bytes, the limit is 65536");
    }
}
