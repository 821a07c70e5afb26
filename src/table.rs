//! Aligned plain-text tables for the command line.

/// The widest a cell is shown; a longer one is cut and ends in `…`.
pub const MAX_CELL: usize = 64;

/// Renders rows under headers, each column as wide as its widest cell (at most [`MAX_CELL`]
/// characters), two spaces apart. Control characters are shown escaped (`\n`), so that one row
/// stays one line whatever a cell holds.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let headers: Vec<String> = headers.iter().map(|h| cell(h)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(c);
            // Padding by hand: `format!("{c:<w$}")` panics beyond a width of 65,535.
            text.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(c.chars().count()),
            ));
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut out = line(&headers);
    for row in &rows {
        out += &line(row);
    }
    out
}

/// A cell as shown: control characters escaped, at most [`MAX_CELL`] characters.
fn cell(text: &str) -> String {
    let mut shown = String::new();
    let mut count = 0;
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.into()
        };
        let len = piece.chars().count();
        if count + len > MAX_CELL - 1 {
            shown.push('…');
            return shown;
        }
        shown.push_str(&piece);
        count += len;
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let out = render(
            &["a", "bb"],
            &[
                vec!["long".into(), "x".into()],
                vec!["s".into(), "yy".into()],
            ],
        );
        assert_eq!(out, "a     bb\nlong  x\ns     yy\n");
    }

    #[test]
    fn long_cells_are_cut_with_an_ellipsis_and_control_characters_escaped() {
        let huge = "x".repeat(100_000);
        let fits = "y".repeat(MAX_CELL - 1);
        let out = render(
            &["ID", "NOTE"],
            &[
                vec![huge, "new\nline".into()],
                vec![fits.clone(), "ok".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let cut = format!("{}…", "x".repeat(MAX_CELL - 1));
        assert_eq!(lines[1], format!("{cut}  new\\nline"));
        assert_eq!(
            lines[2],
            format!("{fits}   ok"),
            "a cell that fits is whole"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_cells_render_one_line_per_row_within_the_width(
            headers in proptest::collection::vec(".{0,80}", 0..5),
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::prelude::any::<String>(), 0..6), 0..6),
            long in 0usize..200_000,
        ) {
            let mut rows = rows;
            if let Some(row) = rows.first_mut() {
                row.push("z".repeat(long));
            }
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            let out = render(&headers, &rows);
            proptest::prop_assert_eq!(out.lines().count(), rows.len() + 1);
            let limit = headers.len().max(rows.iter().map(Vec::len).max().unwrap_or(0)) * (MAX_CELL + 2);
            for line in out.lines() {
                proptest::prop_assert!(line.chars().count() <= limit, "{line}");
            }
        }
    }
}
