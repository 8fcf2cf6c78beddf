//! Aligned columns and key/value blocks for people.

/// A table: a header row and rows of cells, printed with aligned columns.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers; a header starting with `>` is
    /// right-aligned (numbers), the `>` is not printed.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are blank, extra ones dropped).
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, two spaces between columns, no
    /// trailing spaces.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - width(c));
                if self.right[i] {
                    line.push_str(&pad);
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    line.push_str(&pad);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k}:{}{v}\n", " ".repeat(w + 2 - k.chars().count())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_numbers_go_right() {
        let mut t = Table::new(&["ID", "NAME", ">CPUS", "NOTE"]);
        t.row(vec!["a".into(), "long-name".into(), "4".into(), String::new()]);
        t.row(vec!["bbb".into(), "x".into(), "16".into(), "ok".into()]);
        assert_eq!(
            t.render(),
            "ID   NAME       CPUS  NOTE\n\
             a    long-name     4\n\
             bbb  x            16  ok\n"
        );
    }

    #[test]
    fn fields_align() {
        assert_eq!(
            fields(&[("id", "1".into()), ("memory", "2 GiB".into())]),
            "id:      1\nmemory:  2 GiB\n"
        );
    }
}
