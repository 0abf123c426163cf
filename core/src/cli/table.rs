//! Plain-text tables, colours and human-readable times for the command line.
//!
//! Hand-written rather than a table crate: the needs are small (left-aligned columns, an
//! optional colour per cell) and the live progress view must know exactly how many lines it
//! printed to redraw them in place.

use std::io::IsTerminal;

pub(crate) use crate::clock::human_duration;
use crate::clock::{Millis, format_rfc3339};
use crate::state::{StepState, TaskState};

/// Whether stderr is a terminal (live redraw, colours in logs).
pub(crate) fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// Whether to colour stdout: a terminal, and the user did not ask for `NO_COLOR`.
pub(crate) fn stdout_colors() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Whether to colour stderr.
pub(crate) fn stderr_colors() -> bool {
    stderr_is_tty() && std::env::var_os("NO_COLOR").is_none()
}

/// A colour for a cell (ANSI SGR codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Color {
    Green,
    Red,
    Yellow,
    Cyan,
    Dim,
}

impl Color {
    fn sgr(self) -> &'static str {
        match self {
            Color::Green => "32",
            Color::Red => "31",
            Color::Yellow => "33",
            Color::Cyan => "36",
            Color::Dim => "2",
        }
    }
}

/// Wraps `text` in the colour's escape codes when `on`.
pub(crate) fn paint(text: &str, color: Option<Color>, on: bool) -> String {
    match color {
        Some(c) if on && !text.is_empty() => format!("\x1b[{}m{text}\x1b[0m", c.sgr()),
        _ => text.to_string(),
    }
}

/// The colour people expect for a step state: green done, red failed, yellow busy.
pub(crate) fn step_color(s: StepState) -> Option<Color> {
    match s {
        StepState::Complete | StepState::ResolvedManually => Some(Color::Green),
        StepState::Error | StepState::EnqueuedAsErrorForOrchestration => Some(Color::Red),
        StepState::InProgress | StepState::EnqueuedForOrchestration => Some(Color::Yellow),
        StepState::WaitingForRetry => Some(Color::Cyan),
        StepState::Cancelled | StepState::Pending | StepState::Enqueued => Some(Color::Dim),
    }
}

/// The colour for a task state.
pub(crate) fn task_color(s: TaskState) -> Option<Color> {
    match s {
        TaskState::Complete | TaskState::ResolvedManually => Some(Color::Green),
        TaskState::Error | TaskState::BlockedByFailures => Some(Color::Red),
        TaskState::Cancelled => Some(Color::Dim),
        TaskState::WaitingForRetry => Some(Color::Cyan),
        _ => Some(Color::Yellow),
    }
}

/// A table: a header row and rows of cells, each cell optionally coloured.
#[derive(Debug, Default)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<(String, Option<Color>)>>,
}

impl Table {
    /// A table with these column titles.
    pub(crate) fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row of uncoloured cells.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| (c, None)).collect());
    }

    /// Adds a row with per-cell colours.
    pub(crate) fn row_colored(&mut self, cells: Vec<(String, Option<Color>)>) {
        self.rows.push(cells);
    }

    /// The table as lines (no trailing newline), columns padded to their widest cell; the
    /// last column is not padded so lines carry no trailing blanks.
    pub(crate) fn lines(&self, colors: bool) -> Vec<String> {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (i, (cell, _)) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(width(cell));
            }
        }
        let render = |cells: Vec<(&str, Option<Color>)>| {
            let mut line = String::new();
            for (i, (cell, color)) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(&paint(cell, *color, colors));
                if i + 1 < cells.len() {
                    line.push_str(&" ".repeat(widths[i].saturating_sub(width(cell))));
                }
            }
            // An empty last cell would leave the previous column's padding behind.
            line.truncate(line.trim_end().len());
            line
        };
        let mut out = Vec::with_capacity(self.rows.len() + 1);
        let bold_header = if colors {
            self.header
                .iter()
                .map(|h| format!("\x1b[1m{h}\x1b[0m"))
                .collect::<Vec<_>>()
        } else {
            self.header.clone()
        };
        // Pad the header by the plain titles' widths, not the escape-laden ones.
        let mut header_line = String::new();
        for (i, h) in bold_header.iter().enumerate() {
            if i > 0 {
                header_line.push_str("  ");
            }
            header_line.push_str(h);
            if i + 1 < columns {
                header_line.push_str(&" ".repeat(widths[i].saturating_sub(width(&self.header[i]))));
            }
        }
        out.push(header_line);
        for row in &self.rows {
            out.push(render(
                row.iter().map(|(c, col)| (c.as_str(), *col)).collect(),
            ));
        }
        out
    }

    /// Prints the table on stdout.
    pub(crate) fn print(&self) {
        for line in self.lines(stdout_colors()) {
            outln!("{line}");
        }
    }
}

/// Display width of a cell: characters, which is right for the ASCII and box-drawing text
/// the tables hold.
fn width(s: &str) -> usize {
    s.chars().count()
}

/// An optional timestamp as RFC 3339, or `-`.
pub(crate) fn time_or_dash(ms: Option<Millis>) -> String {
    ms.map(format_rfc3339).unwrap_or_else(|| "-".into())
}

/// Shortens `s` to at most `max` characters, saying how much was cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max).collect();
    format!("{head}… ({count} chars; --format json shows all)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_without_trailing_blanks() {
        let mut t = Table::new(&["step", "state"]);
        t.row(vec!["a".into(), "complete".into()]);
        t.row(vec!["longer_name".into(), "error".into()]);
        let lines = t.lines(false);
        assert_eq!(lines[0], "step         state");
        assert_eq!(lines[1], "a            complete");
        assert_eq!(lines[2], "longer_name  error");
    }

    #[test]
    fn colours_do_not_disturb_alignment() {
        let mut t = Table::new(&["a", "b"]);
        t.row_colored(vec![("x".into(), Some(Color::Red)), ("y".into(), None)]);
        let lines = t.lines(true);
        assert_eq!(lines[1], "\x1b[31mx\x1b[0m  y");
    }
}
