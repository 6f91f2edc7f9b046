//! The unit-file syntax as `config_parse()` in systemd's `src/shared/conf-parser.c` reads it.
//!
//! - A line whose first non-blank character is `#` or `;` is a comment, also in the middle of a
//!   continued line.
//! - A line ending in an unescaped `\` continues on the next line; the `\` becomes a space.
//! - `[Section]` must end in `]`; assignments before any section are ignored.
//! - `KEY=VALUE` is split at the first `=`, both sides stripped of blanks; no quote removal.

use std::path::Path;

use crate::error::GuestUnitsError;

/// One `KEY=VALUE` in its section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Assignment {
    pub(crate) section: String,
    pub(crate) key: String,
    pub(crate) value: String,
    /// The line where the assignment starts.
    pub(crate) line: usize,
}

/// systemd's `WHITESPACE`.
const BLANKS: &[char] = &[' ', '\t', '\n', '\r'];

/// Splits a unit file into its assignments, in file order.
pub(crate) fn parse(file: &Path, bytes: &[u8]) -> Result<Vec<Assignment>, GuestUnitsError> {
    let text = std::str::from_utf8(bytes).map_err(|e| GuestUnitsError::NotUtf8 {
        file: file.to_path_buf(),
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);

    let mut out = Vec::new();
    let mut section: Option<String> = None;
    let mut continuation: Option<(String, usize)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let first = raw.trim_start_matches(BLANKS);
        if first.starts_with('#') || first.starts_with(';') {
            continue;
        }
        let (mut logical, start) = match continuation.take() {
            Some((mut joined, start)) => {
                joined.push_str(raw);
                (joined, start)
            }
            None => (raw.to_owned(), line),
        };
        if ends_in_escape(&logical) {
            logical.pop();
            logical.push(' ');
            continuation = Some((logical, start));
            continue;
        }
        parse_line(file, start, &logical, &mut section, &mut out)?;
    }
    if let Some((logical, start)) = continuation {
        parse_line(file, start, &logical, &mut section, &mut out)?;
    }
    Ok(out)
}

/// True when the last character is a backslash that is not itself escaped.
fn ends_in_escape(s: &str) -> bool {
    let mut escaped = false;
    for c in s.chars() {
        escaped = !escaped && c == '\\';
    }
    escaped
}

fn parse_line(
    file: &Path,
    line: usize,
    logical: &str,
    section: &mut Option<String>,
    out: &mut Vec<Assignment>,
) -> Result<(), GuestUnitsError> {
    let l = logical.trim_matches(BLANKS);
    if l.is_empty() {
        return Ok(());
    }
    if l.starts_with('[') {
        let name = l
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .filter(|name| string_is_safe(name))
            .ok_or_else(|| GuestUnitsError::SectionHeader {
                file: file.to_path_buf(),
                line,
                header: l.to_owned(),
            })?;
        *section = Some(name.to_owned());
        return Ok(());
    }
    let Some(current) = section.as_ref() else {
        return Ok(());
    };
    let Some((key, value)) = l.split_once('=') else {
        return Err(GuestUnitsError::MissingEquals {
            file: file.to_path_buf(),
            line,
            text: l.to_owned(),
        });
    };
    if key.is_empty() {
        return Err(GuestUnitsError::MissingKey {
            file: file.to_path_buf(),
            line,
        });
    }
    out.push(Assignment {
        section: current.clone(),
        key: key.trim_matches(BLANKS).to_owned(),
        value: value.trim_matches(BLANKS).to_owned(),
        line,
    });
    Ok(())
}

/// `string_is_safe()`: no control characters, quotes or backslashes.
fn string_is_safe(s: &str) -> bool {
    !s.chars()
        .any(|c| c < ' ' || c == '\u{7f}' || matches!(c, '"' | '\'' | '\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignments(text: &str) -> Vec<(String, String, String, usize)> {
        parse(Path::new("t.socket"), text.as_bytes())
            .unwrap()
            .into_iter()
            .map(|a| (a.section, a.key, a.value, a.line))
            .collect()
    }

    #[test]
    fn continuation_skips_comment_lines_and_replaces_the_backslash() {
        let got = assignments("[Socket]\nListenStream=1\\\n# note\n2\nAccept = yes \n");
        assert_eq!(
            got,
            vec![
                ("Socket".into(), "ListenStream".into(), "1 2".into(), 2),
                ("Socket".into(), "Accept".into(), "yes".into(), 5),
            ]
        );
    }

    #[test]
    fn escaped_backslash_does_not_continue() {
        let got = assignments("[Socket]\nX=a\\\\\nY=b\n");
        assert_eq!(got[0].2, "a\\\\");
        assert_eq!(got[1].1, "Y");
    }

    #[test]
    fn continuation_at_end_of_file_is_parsed() {
        let got = assignments("[Socket]\nX=a\\");
        assert_eq!(got, vec![("Socket".into(), "X".into(), "a".into(), 2)]);
    }

    #[test]
    fn assignments_before_a_section_are_ignored() {
        assert!(assignments("X=1\n").is_empty());
    }
}
