//! [`SpecError`]: what was wrong with a job spec, where, and what is accepted.

use std::fmt;

/// What kind of mistake a [`SpecError`] reports, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SpecErrorKind {
    /// The text is not well-formed TOML or JSON.
    Syntax,
    /// A key that the schema does not know.
    UnknownField,
    /// A value of the wrong type (a string where an integer belongs, ...).
    WrongType,
    /// A required field or table is absent.
    Missing,
    /// A value of the right type that is out of range or otherwise not accepted.
    Invalid,
}

/// A mistake in a job spec, with where it is and what is accepted.
///
/// `Display` renders `origin:line:column: field: message`, leaving out the parts that are
/// unknown, for example
/// `job.toml:7:9: resources.nodes: must be at least 1, got 0 (accepted: an integer from 1 to 100000)`.
/// The message already ends with the `(accepted: ...)` part when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct SpecError {
    /// The name of the spec's source used in messages (a file name, or e.g. `request body`).
    pub origin: String,
    /// One-based line of the offending text, when known.
    pub line: Option<usize>,
    /// One-based column (in characters) of the offending text, when known.
    pub column: Option<usize>,
    /// Dotted path of the offending field, e.g. `resources.nodes` or `launch.command[0]`;
    /// `None` for syntax errors.
    pub field: Option<String>,
    /// What kind of mistake this is.
    pub kind: SpecErrorKind,
    /// What was wrong and what is accepted.
    pub message: String,
}

impl SpecError {
    /// An error about `field` with no position yet; parsers fill in `origin`, `line` and `column`.
    pub(crate) fn field(kind: SpecErrorKind, field: impl Into<String>, message: String) -> Self {
        SpecError {
            origin: String::new(),
            line: None,
            column: None,
            field: Some(field.into()),
            kind,
            message,
        }
    }

    /// Sets the position from a byte offset into `source`, unless one is already set.
    pub(crate) fn locate(&mut self, source: &str, offset: usize) {
        if self.line.is_none() {
            let (line, column) = line_column(source, offset);
            self.line = Some(line);
            self.column = Some(column);
        }
    }

    fn render(&self) -> String {
        use fmt::Write;
        let mut out = self.origin.clone();
        if let Some(line) = self.line {
            let _ = write!(out, ":{line}");
            if let Some(column) = self.column {
                let _ = write!(out, ":{column}");
            }
        }
        out.push_str(": ");
        if let Some(field) = &self.field {
            out.push_str(field);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }
}

/// One-based (line, column) of byte `offset` in `source`; the column counts characters.
pub(crate) fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_lines_and_characters() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 4), (1, 5));
        assert_eq!(line_column(src, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_column(src, 9), (2, 3));
        assert_eq!(line_column(src, 1000), (3, 1));
    }

    #[test]
    fn display_leaves_out_unknown_parts() {
        let mut e = SpecError::field(SpecErrorKind::Invalid, "resources.nodes", "bad".into());
        e.origin = "job.json".into();
        assert_eq!(e.to_string(), "job.json: resources.nodes: bad");
        e.locate("\n\n  x", 4);
        assert_eq!(e.to_string(), "job.json:3:3: resources.nodes: bad");
        e.field = None;
        assert_eq!(e.to_string(), "job.json:3:3: bad");
    }
}
