//! Text from other people's agents, made safe to show: escaping is maud's; here control
//! characters and direction overrides become visible marks instead of acting on the page.

/// Whether `c` reorders or hides text around it (bidirectional controls, zero-width marks).
fn is_invisible_control(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{061C}' | '\u{FEFF}')
}

/// `text` with every control character but newline and tab shown as a mark: C0 controls
/// as their Unicode control pictures (ESC as ␛), the rest as `⟨U+XXXX⟩`.
pub fn visible(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\u{0}'..='\u{1F}' => out.push(char::from_u32(0x2400 + c as u32).expect("a control picture")),
            '\u{7F}' => out.push('\u{2421}'),
            c if ('\u{80}'..='\u{9F}').contains(&c) || is_invisible_control(c) => {
                out.push_str(&format!("⟨U+{:04X}⟩", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Bodies longer than this many characters (or lines) are folded: a summary, the rest on demand.
pub const FOLD_CHARS: usize = 1200;
pub const FOLD_LINES: usize = 24;

/// The visible start of a long text and whether it was cut.
pub fn fold(text: &str) -> (String, bool) {
    let lines = text.lines().count();
    if text.chars().count() <= FOLD_CHARS && lines <= FOLD_LINES {
        return (text.to_owned(), false);
    }
    let head: String = text.lines().take(FOLD_LINES / 2).collect::<Vec<_>>().join("\n");
    let head: String = head.chars().take(FOLD_CHARS / 2).collect();
    (head, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_shown_not_obeyed() {
        assert_eq!(visible("a\u{1b}[31mred\u{7}"), "a␛[31mred␇");
        assert_eq!(visible("line\nnext\tcol"), "line\nnext\tcol");
        assert_eq!(visible("abc\u{202E}fed"), "abc⟨U+202E⟩fed");
        assert_eq!(visible("x\u{85}y\u{2066}z\u{200B}"), "x⟨U+0085⟩y⟨U+2066⟩z⟨U+200B⟩");
        assert_eq!(visible("\u{0}\u{7f}"), "␀␡");
        assert_eq!(visible("plain ✓ 日本"), "plain ✓ 日本");
    }

    #[test]
    fn long_texts_fold() {
        assert_eq!(fold("short"), ("short".into(), false));
        let (head, cut) = fold(&"x".repeat(5000));
        assert!(cut && head.chars().count() == FOLD_CHARS / 2);
        let many = (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join("\n");
        let (head, cut) = fold(&many);
        assert!(cut && head.lines().count() == FOLD_LINES / 2);
    }
}
