//! Aligned text tables for people, and the small formatting helpers the views share.
//! Every cell is cleaned of control characters: much of what is shown came from hosts.

/// A table: a head and rows of cells, columns padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines, two spaces between columns, no trailing blanks.
    pub fn render(&self) -> String {
        let clean: Vec<Vec<String>> = std::iter::once(&self.head)
            .chain(&self.rows)
            .map(|r| r.iter().map(|c| cell(c)).collect())
            .collect();
        let cols = clean.iter().map(Vec::len).max().unwrap_or(0);
        let mut width = vec![0; cols];
        for r in &clean {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &clean {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(c);
                if i + 1 < r.len() {
                    line.push_str(&" ".repeat(width[i] - c.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A cell as shown: control characters (an ANSI escape from a host's text) replaced.
fn cell(s: &str) -> String {
    proto::clean_text(s, 4096)
}

/// `s` cut to `max` characters with `…`.
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// How long ago `t` (Unix seconds) was at `now`: `12s ago`, `5m ago`; `never` for 0.
pub fn ago(now: i64, t: i64) -> String {
    if t <= 0 {
        return "never".into();
    }
    let d = now - t;
    if d < 0 {
        return format!("in {}", span((-d) as u64));
    }
    format!("{} ago", span(d as u64))
}

/// A duration in its largest unit: `45s`, `3m`, `2h`, `4d`.
pub fn span(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Unix seconds as `2024-05-01 12:00:00Z`; `-` for 0.
pub fn when(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// The current Unix time.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `a, b, c` and `+N more` when `total` is larger than the list.
pub fn sample(hosts: &[String], total: u64) -> String {
    let mut s = hosts.join(", ");
    let more = total.saturating_sub(hosts.len() as u64);
    if more > 0 {
        if !s.is_empty() {
            s.push_str(", ");
        }
        s.push_str(&format!("+{more} more"));
    }
    s
}

/// `-` for an empty text.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_cells_are_cleaned() {
        let mut t = Table::new(&["HOST", "STATE"]);
        t.row(vec!["web-001".into(), "running".into()]);
        t.row(vec!["a".into(), "bad\x1b[31m".into()]);
        assert_eq!(
            t.render(),
            "HOST     STATE\nweb-001  running\na        bad [31m\n"
        );
    }

    #[test]
    fn times_read_as_people_say_them() {
        assert_eq!(ago(1000, 0), "never");
        assert_eq!(ago(1000, 990), "10s ago");
        assert_eq!(ago(10_000, 10_000 - 300), "5m ago");
        assert_eq!(ago(1_000_000, 1_000_000 - 3 * 86400), "3d ago");
        assert_eq!(when(1_700_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(sample(&["a".into(), "b".into()], 5), "a, b, +3 more");
        assert_eq!(sample(&[], 0), "");
        assert_eq!(cut("abcdef", 4), "abc…");
    }
}
